"""The worklist in a real browser: a real node runs two studies through the AI path, and a
radiologist in headless Chromium sees the escalated one first, opens it and accepts a finding.

dcmtk's storescu sends a chest phantom with nodules (lung-nodule-demo, escalated to STAT by
its findings) and a plain chest phantom (ct-organs-threshold, ROUTINE) that arrives first,
so only the escalation can put the nodule study on top. The page is loaded once, before the
results exist: the STAT row must appear through the page's own live refresh.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pacs_ai.phantoms.chest_ct import Geometry, Nodule, write_chest_ct
from tests.peers import NodeProcess, dcmtk, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

RULES = """
[http]
worklist_refresh_s = 1

[[rules]]
name = "nodules"
models = ["lung-nodule-demo"]
match.Modality = "CT"
match.AccessionNumber = "ACCNOD"
match.NumberOfSeriesRelatedInstances = { min = 20 }
escalate = [{ finding = "nodule", min_certainty = 0.5, priority = "STAT" }]

[[rules]]
name = "organs"
models = ["ct-organs-threshold"]
match.Modality = "CT"
match.AccessionNumber = "ACCORG"
match.NumberOfSeriesRelatedInstances = { min = 20 }
"""


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (deploy/install-system-deps.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    # An explicit driver path: Selenium Manager never looks for one on the network.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def api(node: NodeProcess, token: str, path: str) -> Any:
    request = urllib.request.Request(node.url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def send(node: NodeProcess, folder: Path) -> None:
    result = dcmtk(
        "storescu", "+sd", "+r", "-aec", node.ae_title, "127.0.0.1", str(node.port), str(folder)
    )
    assert result.returncode == 0, result.stderr


def test_radiologist_sees_stat_first_and_accepts_a_finding(
    node_factory: type[NodeProcess], tmp_path: Path, browser: Any
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    organs = write_chest_ct(
        tmp_path / "organs",
        Geometry(rows=256, columns=256, pixel_spacing_mm=1.4, slices=40, slice_thickness_mm=2.5),
        seed=5,
        patient_id="ORG-1",
        accession="ACCORG",
        with_lung_series=False,
        with_scout=False,
    )
    nodules = write_chest_ct(
        tmp_path / "nodules",
        # 48 slices around the two nodules: the nodule model takes ~1 s per slice on 2 CPUs.
        Geometry(slices=48, z0_mm=-165.0),
        seed=7,
        patient_id="NOD-1",
        accession="ACCNOD",
        with_lung_series=False,
        with_scout=False,
        nodules=(Nodule((-72.0, -5.0, -140.0), 6.0), Nodule((70.0, 20.0, -130.0), 4.5)),
    )
    node = node_factory(tmp_path / "node", ai_worker=True, extra_toml=RULES).start()
    token = node.token("radiologist", name="dr-browser")

    # Log in first: the worklist is open before any study arrives.
    browser.get(node.url + "/")
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "login").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "worklist"))

    send(node, tmp_path / "organs")  # ROUTINE, and first in: on top until the escalation
    send(node, tmp_path / "nodules")

    def first_row() -> dict[str, str] | None:
        # Read in one go: the live refresh replaces the rows every second, so an element
        # found a moment ago may be gone.
        row: dict[str, str] | None = browser.execute_script(
            "const r = document.querySelector('#worklist tbody tr');"
            "return r && {cls: r.className, id: r.dataset.studyId, text: r.innerText};"
        )
        return row

    # No reload from here on: the page's refresh must bring the STAT study to the top.
    WebDriverWait(browser, 150, poll_frequency=1).until(
        lambda d: (row := first_row()) is not None and "prio-stat" in row["cls"]
    )

    def all_done() -> bool:
        items = api(node, token, "/api/worklist")["items"]
        return (
            len(items) == 2
            and all(job["state"] == "done" for item in items for job in item["ai"])
            and all(item["ai"] for item in items)
        )

    wait_for(all_done, 120, "both studies' jobs done", interval=1)
    page = api(node, token, "/api/worklist")
    stat, routine = page["items"]
    assert stat["study_instance_uid"] == nodules.study_instance_uid
    assert (stat["priority"], routine["priority"]) == ("STAT", "ROUTINE")
    assert routine["study_instance_uid"] == organs.study_instance_uid
    assert stat["findings_summary"].startswith("lung-nodule-demo: ")
    WebDriverWait(browser, 10).until(
        lambda d: "ct-organs-threshold: body" in d.find_element(By.ID, "worklist").text
    )
    row = first_row()
    assert row is not None and row["id"] == str(stat["study_id"])
    assert "PHANTOM, CHEST" in row["text"] and "ACCNOD" in row["text"]
    worklist_png = tmp_path / "worklist.png"
    browser.save_screenshot(str(worklist_png))
    print(f"worklist screenshot: {worklist_png}")

    WebDriverWait(browser, 10, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#worklist tbody tr a.open").click() or True
    )
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "preview"))
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script(
            "const i = document.getElementById('preview'); return i.complete && i.naturalWidth;"
        )
    )
    assert browser.execute_script("return document.getElementById('preview').naturalWidth") == 512
    state = browser.find_element(By.ID, "review-state")
    assert state.text == "unreviewed"

    accept = browser.find_element(By.CSS_SELECTOR, 'button.review.accept[data-finding="Nodule 1"]')
    accept.click()
    # Two nodules in the phantom: one accepted leaves the other open.
    found = _findings(api(node, token, f"/api/studies/{stat['study_id']}"))
    expected = "accepted" if len(found) == 1 else "partial"
    # The page re-renders the state after the review: an element found a moment before may
    # be gone (stale) when read.
    WebDriverWait(browser, 10, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: d.find_element(By.ID, "review-state").text == expected
    )
    history = browser.find_element(By.ID, "history").text
    assert "dr-browser" in history and "Nodule 1" in history
    detail = api(node, token, f"/api/studies/{stat['study_id']}")
    assert detail["study"]["review_state"] == expected.upper()
    (review,) = detail["reviews"]
    assert (review["reviewer"], review["action"], review["finding"]) == (
        "dr-browser",
        "ACCEPT",
        "Nodule 1",
    )
    study_png = tmp_path / "study.png"
    browser.save_screenshot(str(study_png))
    print(f"study screenshot: {study_png}")


def _findings(detail: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for job in detail["jobs"] for f in job["findings"]]
