"""DICOMweb in-process: the multipart reader, STOW-RS statuses, QIDO-RS matching, WADO-RS.

Real DICOM files throughout (pydicom's test files and the chest phantom), stored through the
node's own STOW-RS into a real spool and database.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select

from pacs_ai.dicom.header import read_header
from pacs_ai.phantoms.chest_ct import ChestTruth, Geometry, write_chest_ct
from pacs_ai.pipeline.facts import series_facts
from pacs_ai.storage import index
from pacs_ai.storage.recorder import InstanceRecorder
from pacs_ai.storage.schema import COMPLETE, instances, studies
from pacs_ai.web.context import WebContext
from pacs_ai.web.dicomweb.attributes import Level
from pacs_ai.web.dicomweb.multipart import (
    MediaTypeError,
    MultipartError,
    MultipartReader,
    parse_media_type,
    stow_boundary,
)
from pacs_ai.web.dicomweb.query import MAX_LIMIT, QueryError, parse_query
from tests.databases import database_params, postgres_database
from tests.realdata import real_file
from tests.web import bearer, web_client

BOUNDARY = "pacs-ai-test-boundary"
DICOM_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
REAL = ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG-LL.dcm", "US1_J2KR.dcm"]
REAL += ["SC_rgb_jpeg_dcmtk.dcm", "rtplan.dcm"]

# Failure reasons (PS3.18 Table I.2-2) as the JSON carries them.
CANNOT_UNDERSTAND = 0xC000
STUDY_MISMATCH = 0xC409

# More under `make fuzz` (PACS_AI_FUZZ_EXAMPLES).
FUZZ_EXAMPLES = max(300, int(os.environ.get("PACS_AI_FUZZ_EXAMPLES", "300")))


def body_of(
    parts: list[bytes], boundary: str = BOUNDARY, part_type: str = "application/dicom"
) -> bytes:
    chunks = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode(), part, b"\r\n"]
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


def values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value", []))


def uids_in(sequence: list[dict[str, Any]]) -> list[str]:
    return [values(i, "00081155")[0] for i in sequence if values(i, "00081155")]


def read_parts(response: Any) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer."""
    _, params = parse_media_type(response.headers["content-type"])
    reader = MultipartReader(params["boundary"].encode())
    parts = reader.feed(response.content)
    reader.close()
    return [(p.headers, p.body) for p in parts]


# --- the multipart reader ------------------------------------------------------------------


def test_reader_finds_the_same_parts_however_the_body_is_chunked() -> None:
    tricky = b"\r\n--" + BOUNDARY.encode()[:-1] + b"x\r\n" + bytes(range(256)) * 40
    parts = [b"first", b"", tricky, b"\r\n\r\nlast\r\n"]
    body = b"preamble to ignore\r\n" + body_of(parts) + b"epilogue to ignore"
    for size in (1, 3, 7, 64, 4096, len(body)):
        reader = MultipartReader(BOUNDARY.encode())
        got = []
        for start in range(0, len(body), size):
            got += reader.feed(body[start : start + size])
        reader.close()
        assert [p.body for p in got] == parts, size
        assert all(p.content_type == "application/dicom" for p in got)


def test_reader_takes_parts_without_headers_and_folded_headers() -> None:
    body = (
        f"--{BOUNDARY}\r\n\r\nA\r\n--{BOUNDARY}  \r\nContent-Type: application/dicom;\r\n"
        f" transfer-syntax=1.2.840.10008.1.2.1\r\n\r\nB\r\n--{BOUNDARY}--"
    ).encode()
    reader = MultipartReader(BOUNDARY.encode())
    parts = reader.feed(body)
    reader.close()
    assert [p.body for p in parts] == [b"A", b"B"]
    assert parts[0].headers == {}
    assert parts[1].headers["content-type"].endswith("transfer-syntax=1.2.840.10008.1.2.1")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"no boundary anywhere", "holds no part"),
        (f"--{BOUNDARY}\r\n\r\ncut short".encode(), "ended inside part 1"),
        (f"--{BOUNDARY}\r\nContent-Type: x".encode(), "ended inside part headers"),
        (f"--{BOUNDARY}garbage\r\n\r\nA\r\n--{BOUNDARY}--".encode(), "unexpected bytes"),
        (f"--{BOUNDARY}\r\nno colon here\r\n\r\nA\r\n--{BOUNDARY}--".encode(), "malformed"),
        (f"--{BOUNDARY}\r\nX: {'y' * 20000}".encode(), "longer than"),
    ],
)
def test_reader_rejects_malformed_bodies(body: bytes, reason: str) -> None:
    reader = MultipartReader(BOUNDARY.encode())
    with pytest.raises(MultipartError, match=reason):
        reader.feed(body)
        reader.close()


def test_reader_keeps_no_preamble_in_memory() -> None:
    reader = MultipartReader(BOUNDARY.encode())
    for _ in range(200):
        assert reader.feed(b"x" * 65536) == []
    assert len(reader._buffer) <= len(BOUNDARY) + 2
    assert [p.body for p in reader.feed(b"\r\n" + body_of([b"A"]))] == [b"A"]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(data=st.binary(max_size=400), cut=st.integers(min_value=1, max_value=50))
def test_reader_fails_only_with_multipart_error(data: bytes, cut: int) -> None:
    seeded = data.replace(b"B", f"\r\n--{BOUNDARY}".encode())
    reader = MultipartReader(BOUNDARY.encode())
    with suppress(MultipartError):
        for start in range(0, len(seeded), cut):
            reader.feed(seeded[start : start + cut])
        reader.close()


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from('multipart/related; type="application/dicom\\=,b '), max_size=80
    )
)
def test_content_type_parsing_fails_only_with_its_own_errors(content_type: str) -> None:
    with suppress(MediaTypeError, MultipartError):
        stow_boundary(content_type)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "PatientName",
                    "StudyDate",
                    "00100020",
                    "SeriesNumber",
                    "limit",
                    "offset",
                    "includefield",
                    "ModalitiesInStudy",
                    "StudyTime",
                    "x",
                ]
            ),
            st.text(alphabet=st.sampled_from("0123456789-*?,\\.aZ "), max_size=20),
        ),
        max_size=5,
    )
)
def test_query_parsing_fails_only_with_query_error(params: list[tuple[str, str]]) -> None:
    levels = frozenset(Level)
    try:
        query = parse_query(params, levels, levels)
    except QueryError:
        return
    assert 1 <= query.limit <= MAX_LIMIT and query.offset >= 0


@pytest.mark.parametrize(
    "content_type",
    [
        f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"',
        f"multipart/related; type=application/dicom; boundary={BOUNDARY}",
        f'Multipart/Related;boundary={BOUNDARY};TYPE="Application/DICOM"',
        f'multipart/related; type="application/dicom; transfer-syntax=*"; boundary={BOUNDARY}',
        # Orthanc's STOW-RS client: two UUIDs, longer than RFC 2046's 70 characters.
        f'multipart/related; type="application/dicom"; boundary={BOUNDARY}{"-" * 60}',
    ],
)
def test_stow_content_types_quoted_or_not(content_type: str) -> None:
    assert stow_boundary(content_type).startswith(BOUNDARY.encode())


@pytest.mark.parametrize(
    ("content_type", "error"),
    [
        ("application/dicom", MediaTypeError),
        (f"multipart/related; boundary={BOUNDARY}", MediaTypeError),
        (f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', MediaTypeError),
        (f"multipart/mixed; type=application/dicom; boundary={BOUNDARY}", MediaTypeError),
        ("", MediaTypeError),
        ('multipart/related; type="application/dicom"', MultipartError),
        (f'multipart/related; type="application/dicom"; boundary={"b" * 257}', MultipartError),
        ('multipart/related; type="application/dicom"; boundary="a\tb"', MultipartError),
    ],
)
def test_stow_content_types_refused(content_type: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        stow_boundary(content_type)


def test_parse_media_type_handles_quotes_and_escapes() -> None:
    media, params = parse_media_type('Multipart/Related; a="x;\\"y"; b = z ;c; d=""')
    assert media == "multipart/related"
    assert params == {"a": 'x;"y', "b": "z", "d": ""}


# --- STOW-RS -------------------------------------------------------------------------------


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[TestClient, WebContext]]:
    peers = '[[peers]]\nname = "pacs"\nae_title = "PACSX"\nhost = "127.0.0.1"\nport = 104\n'
    with web_client(tmp_path, peers) as pair:
        yield pair


def post(
    client: TestClient,
    headers: dict[str, str],
    files: list[bytes],
    path: str = "/dicomweb/studies",
    content_type: str = DICOM_TYPE,
) -> Any:
    return client.post(
        path, content=body_of(files), headers={**headers, "Content-Type": content_type}
    )


def test_stow_stores_every_part_and_answers_200(web: tuple[TestClient, WebContext]) -> None:
    client, ctx = web
    files = [real_file(n).read_bytes() for n in ("CT_small.dcm", "MR_small_implicit.dcm")]
    response = post(client, bearer(ctx, "integration"), files)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    answer = response.json()
    sent = [read_header(f).sop_instance_uid for f in files]
    assert uids_in(values(answer, "00081199")) == sent
    assert "Value" not in answer["00081198"]
    first = values(answer, "00081199")[0]
    assert values(first, "00081190")[0].startswith("http://testserver/dicomweb/studies/")
    assert values(first, "00081150") == [read_header(files[0]).sop_class_uid]
    with ctx.engine.connect() as conn:
        rows = conn.execute(select(instances.c.sop_instance_uid, instances.c.path)).all()
        aes = set(conn.execute(select(studies.c.calling_ae)).scalars())
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sent)
    assert aes == {"STOW-RS"}
    stored = {r.sop_instance_uid: (ctx.settings.spool_dir / r.path).read_bytes() for r in rows}
    assert [stored[uid] for uid in sent] == files


def test_stow_token_for_a_peer_stores_as_that_peer(web: tuple[TestClient, WebContext]) -> None:
    client, ctx = web
    response = post(
        client, bearer(ctx, "integration", peer="pacs"), [real_file("CT_small.dcm").read_bytes()]
    )
    assert response.status_code == 200
    (study,) = index.list_studies(ctx.engine)
    assert study.calling_ae == "PACSX"


def test_stow_some_failed_is_202_and_the_bad_part_is_quarantined(
    web: tuple[TestClient, WebContext],
) -> None:
    client, ctx = web
    good = real_file("CT_small.dcm").read_bytes()
    response = post(client, bearer(ctx, "integration"), [good, good[:1000]])
    assert response.status_code == 202
    answer = response.json()
    assert uids_in(values(answer, "00081199")) == [read_header(good).sop_instance_uid]
    (failed,) = values(answer, "00081198")
    assert values(failed, "00081197") == [CANNOT_UNDERSTAND]
    assert ctx.ingest.spool.quarantine_count() == 1


def test_stow_nothing_stored_is_409(web: tuple[TestClient, WebContext]) -> None:
    client, ctx = web
    response = post(client, bearer(ctx, "integration"), [b"not dicom", b"\x00" * 300])
    assert response.status_code == 409
    reasons = [values(i, "00081197")[0] for i in values(response.json(), "00081198")]
    assert len(reasons) == 2 and all(0xC000 <= r <= 0xCFFF for r in reasons)
    assert index.list_studies(ctx.engine) == []


def test_stow_to_a_study_refuses_instances_of_another(web: tuple[TestClient, WebContext]) -> None:
    client, ctx = web
    ct, mr = (real_file(n).read_bytes() for n in ("CT_small.dcm", "MR_small_implicit.dcm"))
    study = read_header(ct).study_instance_uid
    response = post(client, bearer(ctx, "integration"), [ct, mr], f"/dicomweb/studies/{study}")
    assert response.status_code == 202
    (failed,) = values(response.json(), "00081198")
    assert values(failed, "00081197") == [STUDY_MISMATCH]
    assert values(failed, "00081155") == [read_header(mr).sop_instance_uid]
    assert [s.study_instance_uid for s in index.list_studies(ctx.engine)] == [study]
    only_mr = post(client, bearer(ctx, "integration"), [mr], f"/dicomweb/studies/{study}")
    assert only_mr.status_code == 409


def test_stow_disk_below_reserve_is_503_with_retry_after(
    web: tuple[TestClient, WebContext],
) -> None:
    client, ctx = web
    ctx.ingest.spool.reserve_bytes = ctx.ingest.spool.free_bytes() * 2  # the disk is "full"
    response = post(client, bearer(ctx, "integration"), [real_file("CT_small.dcm").read_bytes()])
    assert response.status_code == 503
    assert response.headers["retry-after"] == "60"
    (failed,) = values(response.json(), "00081198")
    assert values(failed, "00081197") == [0xA700]
    assert values(failed, "00081155") == []  # refused before reading: nothing to name


@pytest.mark.parametrize(
    "content_type",
    [
        f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
        "application/dicom",
        f"multipart/related; boundary={BOUNDARY}",
    ],
)
def test_stow_other_media_types_are_415(
    web: tuple[TestClient, WebContext], content_type: str
) -> None:
    client, ctx = web
    files = [real_file("CT_small.dcm").read_bytes()]
    response = post(client, bearer(ctx, "integration"), files, content_type=content_type)
    assert response.status_code == 415
    assert "application/dicom" in response.json()["detail"]


def test_stow_malformed_multipart_is_400(web: tuple[TestClient, WebContext]) -> None:
    client, ctx = web
    response = client.post(
        "/dicomweb/studies",
        content=b"no parts here",
        headers={**bearer(ctx, "integration"), "Content-Type": DICOM_TYPE},
    )
    assert response.status_code == 400
    assert "holds no part" in response.json()["detail"]


def test_stow_truncated_after_stored_parts_reports_them(web: tuple[TestClient, WebContext]) -> None:
    client, ctx = web
    good = real_file("CT_small.dcm").read_bytes()
    cut = body_of([good, good])[: -len(good) // 2]
    response = client.post(
        "/dicomweb/studies",
        content=cut,
        headers={**bearer(ctx, "integration"), "Content-Type": DICOM_TYPE},
    )
    assert response.status_code == 202
    assert uids_in(values(response.json(), "00081199")) == [read_header(good).sop_instance_uid]


def test_stow_needs_the_write_permission(web: tuple[TestClient, WebContext]) -> None:
    client, ctx = web
    files = [real_file("CT_small.dcm").read_bytes()]
    assert post(client, {}, files).status_code == 401
    assert post(client, bearer(ctx, "radiologist"), files).status_code == 403
    assert index.list_studies(ctx.engine) == []


def test_stow_over_the_upload_limit_is_413(tmp_path: Path) -> None:
    with web_client(tmp_path, "[http]\nmax_upload_mb = 0.05\n") as (client, ctx):
        big = real_file("US1_J2KR.dcm").read_bytes()
        assert len(big) > 0.05 * 2**20
        declared = post(client, bearer(ctx, "integration"), [big])
        assert declared.status_code == 413
        assert "max_upload_mb" in declared.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            body = body_of([big])
            for start in range(0, len(body), 8192):
                yield body[start : start + 8192]

        streamed = client.post(
            "/dicomweb/studies",
            content=chunks(),
            headers={**bearer(ctx, "integration"), "Content-Type": DICOM_TYPE},
        )
        assert streamed.status_code == 413
        assert index.list_studies(ctx.engine) == []


# --- QIDO-RS -------------------------------------------------------------------------------


class Held:
    """A node holding real files and a phantom study sent by two peers, plus one SR result."""

    def __init__(self, client: TestClient, ctx: WebContext, phantom: ChestTruth) -> None:
        self.client, self.ctx, self.phantom = client, ctx, phantom
        self.read = bearer(ctx, "radiologist")
        self.real = {n: read_header(real_file(n).read_bytes()) for n in REAL}

    def get(self, path: str, **params: Any) -> Any:
        return self.client.get(f"/dicomweb{path}", params=params, headers=self.read)

    def studies(self, **params: Any) -> list[dict[str, Any]]:
        response = self.get("/studies", **params)
        if response.status_code == 204:
            return []
        assert response.status_code == 200, response.text
        return list(response.json())


def study_uids(answer: list[dict[str, Any]]) -> set[str]:
    return {values(a, "0020000D")[0] for a in answer}


@pytest.fixture(scope="module", params=database_params())
def held(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Held]:
    with ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if request.param == "postgresql" else ""
        yield from _held(tmp_path_factory.mktemp("held"), url)


def _held(root: Path, database_url: str) -> Iterator[Held]:
    phantom = write_chest_ct(
        root / "phantom",
        Geometry(rows=32, columns=32, slices=6),
        seed=5,
        patient_id="PHANTOM-QIDO",
        accession="ACCQ1",
    )
    peers = "".join(
        f'[[peers]]\nname = "{n}"\nae_title = "{n.upper()}"\nhost = "127.0.0.1"\nport = 104\n'
        for n in ("pacs1", "pacs2")
    )
    with web_client(root, peers, database_url) as (client, ctx):
        write = bearer(ctx, "integration")
        files = [real_file(n).read_bytes() for n in REAL]
        assert post(client, write, files).status_code == 200
        # The phantom's series from two senders: two receptions, one study for QIDO.
        by_series: dict[str, list[bytes]] = {}
        for path in phantom.files:
            by_series.setdefault(path.parent.name, []).append(path.read_bytes())
        for n, (_, series_files) in enumerate(sorted(by_series.items())):
            sender = bearer(ctx, "integration", peer="pacs1" if n == 0 else "pacs2")
            assert post(client, sender, series_files).status_code == 200
        yield Held(client, ctx, phantom)


def test_qido_one_study_per_uid_with_counts_over_receptions(held: Held) -> None:
    answer = held.studies()
    assert len(answer) == len(REAL) + 1  # the real files are of distinct studies
    (phantom,) = [a for a in answer if values(a, "0020000D") == [held.phantom.study_instance_uid]]
    receptions = index.find_studies(held.ctx.engine, held.phantom.study_instance_uid)
    assert len(receptions) == 2
    assert values(phantom, "00201206") == [3]  # NumberOfStudyRelatedSeries
    assert values(phantom, "00201208") == [len(held.phantom.files)]
    assert values(phantom, "00080061") == ["CT"]  # ModalitiesInStudy
    assert values(phantom, "00100010") == [{"Alphabetic": "PHANTOM^CHEST"}]
    assert values(phantom, "00080050") == ["ACCQ1"]
    assert values(phantom, "00081190")[0].endswith(f"/studies/{held.phantom.study_instance_uid}")
    assert "00200010" in phantom and "Value" not in phantom["00200010"]  # StudyID: not indexed


def test_qido_study_count_matches_distinct_uids(held: Held) -> None:
    expected = {h.study_instance_uid for h in held.real.values()} | {
        held.phantom.study_instance_uid
    }
    assert study_uids(held.studies()) == expected


@pytest.mark.parametrize(
    ("params", "names"),
    [
        (
            {"PatientName": "compressed*"},
            {"CT_small.dcm", "MR_small_implicit.dcm", "JPEG-LL.dcm", "US1_J2KR.dcm"},
        ),
        ({"PatientName": "*^?T1"}, {"CT_small.dcm"}),
        ({"PatientName": "lestrade^g"}, {"SC_rgb_jpeg_dcmtk.dcm"}),
        ({"PatientID": "1CT1"}, {"CT_small.dcm"}),
        ({"PatientID": "1ct1"}, set()),
        ({"00100020": "4MR1"}, {"MR_small_implicit.dcm"}),
        (
            {"StudyDate": "20040101-20041231"},
            {"CT_small.dcm", "MR_small_implicit.dcm", "JPEG-LL.dcm", "US1_J2KR.dcm"},
        ),
        ({"StudyDate": "-20031231"}, {"rtplan.dcm"}),
        ({"StudyDate": "20040826"}, {"MR_small_implicit.dcm", "JPEG-LL.dcm", "US1_J2KR.dcm"}),
        ({"StudyDate": "20040120-", "ModalitiesInStudy": "NM,US"}, {"JPEG-LL.dcm", "US1_J2KR.dcm"}),
        ({"ModalitiesInStudy": "MR"}, {"MR_small_implicit.dcm"}),
        ({"StudyTime": "0700-0800"}, {"CT_small.dcm"}),
        ({"PatientName": "", "PatientID": "*"}, set(REAL) | {"phantom"}),
    ],
)
def test_qido_study_matching(held: Held, params: dict[str, str], names: set[str]) -> None:
    uid_of = {n: h.study_instance_uid for n, h in held.real.items()}
    uid_of["phantom"] = held.phantom.study_instance_uid
    assert study_uids(held.studies(**params)) == {uid_of[n] for n in names}


def test_qido_uid_lists_comma_or_backslash(held: Held) -> None:
    a = held.real["CT_small.dcm"].study_instance_uid
    b = held.real["rtplan.dcm"].study_instance_uid
    assert study_uids(held.studies(StudyInstanceUID=f"{a},{b}")) == {a, b}
    assert study_uids(held.studies(StudyInstanceUID=f"{a}\\{b}")) == {a, b}
    assert study_uids(held.studies(StudyInstanceUID=a)) == {a}


def test_qido_matched_and_included_attributes_are_returned(held: Held) -> None:
    (plain,) = held.studies(PatientID="1CT1")
    assert "00100010" in plain and "00081030" in plain  # defaults: PatientName, description
    series = held.get(f"/studies/{held.real['CT_small.dcm'].study_instance_uid}/series").json()
    assert "00180015" not in series[0]  # BodyPartExamined is not a default
    asked = held.get(
        f"/studies/{held.phantom.study_instance_uid}/series",
        includefield=["BodyPartExamined", "00181030"],
    ).json()
    assert {values(s, "00180015")[0] for s in asked} == {"CHEST"}
    assert {values(s, "00181030")[0] for s in asked} == {"CHEST ROUTINE"}  # ProtocolName
    everything = held.get(f"/studies/{held.phantom.study_instance_uid}/series", includefield="all")
    assert "00080070" in everything.json()[0]  # Manufacturer


def test_qido_limit_offset_and_the_warning_for_more(held: Held) -> None:
    full = [values(a, "0020000D")[0] for a in held.studies()]
    page = held.get("/studies", limit=2, offset=1)
    assert [values(a, "0020000D")[0] for a in page.json()] == full[1:3]
    assert "additional results" in page.headers["warning"]
    last = held.get("/studies", limit=10, offset=len(full) - 1)
    assert len(last.json()) == 1 and "warning" not in last.headers
    assert held.get("/studies", offset=len(full)).status_code == 204


def test_qido_no_match_is_204_and_bad_queries_say_why(held: Held) -> None:
    assert held.get("/studies", PatientID="NOBODY").status_code == 204
    bad_date = held.get("/studies", StudyDate="2020-01-01")
    assert bad_date.status_code == 400 and "20200101" in bad_date.json()["detail"]
    assert held.get("/studies", limit="ten").status_code == 400
    assert held.get("/studies", includefield="NoSuchThing").status_code == 400
    unknown = held.get(f"/studies/{generate_uid()}/series")
    assert unknown.status_code == 404 and "no study" in unknown.json()["detail"]
    assert held.get("/studies/not-a-uid/series").status_code == 400
    ignored = held.get("/studies", PatientID="1CT1", NotAnAttribute="x", fuzzymatching="true")
    assert ignored.status_code == 200
    assert "NotAnAttribute" in ignored.headers["warning"]
    assert "fuzzymatching" in ignored.headers["warning"]
    assert held.get("/studies", headers={}).status_code == 200
    xml = held.client.get(
        "/dicomweb/studies", headers={**held.read, "Accept": "application/dicom+xml"}
    )
    assert xml.status_code == 406


def test_qido_series_and_instances(held: Held) -> None:
    study = held.phantom.study_instance_uid
    series = held.get(f"/studies/{study}/series").json()
    assert [values(s, "00200011")[0] for s in series] == [1, 2, 3]  # SeriesNumber
    axial = held.phantom.series["AXIAL 1.25 SOFT TISSUE"]
    (found,) = [s for s in series if values(s, "0020000E") == [axial]]
    assert values(found, "00201209") == [6]  # NumberOfSeriesRelatedInstances
    assert "00100010" not in found  # study attributes only for /series
    everywhere = held.get("/series", Modality="MR").json()
    assert [values(s, "00100020") for s in everywhere] == [["4MR1"]]

    listed = held.get(f"/studies/{study}/series/{axial}/instances").json()
    assert [values(i, "00200013")[0] for i in listed] == [1, 2, 3, 4, 5, 6]
    assert values(listed[0], "00081190")[0].endswith(
        f"/series/{axial}/instances/{values(listed[0], '00080018')[0]}"
    )
    assert values(listed[0], "00083002") == ["1.2.840.10008.1.2.1"]
    sized = held.get(f"/studies/{study}/series/{axial}/instances", includefield="Rows,Columns")
    assert {(values(i, "00280010")[0], values(i, "00280011")[0]) for i in sized.json()} == {
        (32, 32)
    }
    ct = held.real["CT_small.dcm"]
    (one,) = held.get("/instances", SOPInstanceUID=ct.sop_instance_uid).json()
    assert values(one, "00100020") == ["1CT1"] and values(one, "00080060") == ["CT"]
    in_study = held.get(f"/studies/{study}/instances", InstanceNumber="3").json()
    assert len(in_study) == 2  # slice 3 of the axial and of the lung series
    assert all("00080060" in i for i in in_study)  # series attributes come along


# --- WADO-RS -------------------------------------------------------------------------------


def test_wado_retrieves_the_stored_bytes(held: Held) -> None:
    ct = held.real["CT_small.dcm"]
    series = f"/studies/{ct.study_instance_uid}/series/{ct.series_instance_uid}"
    response = held.get(f"{series}/instances/{ct.sop_instance_uid}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(
        'multipart/related; type="application/dicom"'
    )
    ((headers, body),) = read_parts(response)
    assert body == real_file("CT_small.dcm").read_bytes()
    assert headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"

    study = held.get(f"/studies/{held.phantom.study_instance_uid}")
    sent = {p.read_bytes() for p in held.phantom.files}
    assert {body for _, body in read_parts(study)} == sent


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        ('multipart/related; type="application/dicom"; transfer-syntax=*', 200),
        (
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90',
            200,
        ),
        ('multipart/related; type="application/dicom"', 200),
        ("*/*", 200),
        ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1', 406),
        (
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1, '
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90',
            200,
        ),
        ("application/dicom+json", 406),
    ],
)
def test_wado_transfer_syntax_negotiation(held: Held, accept: str, status: int) -> None:
    us = held.real["US1_J2KR.dcm"]  # held as JPEG 2000 lossless
    response = held.client.get(
        f"/dicomweb/studies/{us.study_instance_uid}/series/{us.series_instance_uid}",
        headers={**held.read, "Accept": accept},
    )
    assert response.status_code == status, response.text


def test_wado_metadata_without_bulk_data(held: Held) -> None:
    ct = held.real["CT_small.dcm"]
    response = held.get(f"/studies/{ct.study_instance_uid}/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom+json"
    (meta,) = response.json()
    assert "7FE00010" not in meta
    assert values(meta, "00100010") == [{"Alphabetic": "CompressedSamples^CT1"}]
    assert values(meta, "00280010") == [128]
    # A private OB element of 2068 bytes is bulk data: left out; one of 80 bytes stays inline.
    assert "00431029" not in meta
    assert "InlineBinary" in meta["00431028"]
    lung = held.phantom.series["AXIAL 2.5 LUNG"]
    series = held.get(f"/studies/{held.phantom.study_instance_uid}/series/{lung}/metadata").json()
    assert len(series) == 3 and all(values(m, "00080060") == ["CT"] for m in series)


def test_wado_unknown_uids_are_404_with_a_reason(held: Held) -> None:
    ct = held.real["CT_small.dcm"]
    missing = held.get(f"/studies/{ct.study_instance_uid}/series/{generate_uid()}")
    assert missing.status_code == 404 and "no series" in missing.json()["detail"]
    assert held.get(f"/studies/{generate_uid()}/metadata").status_code == 404
    assert held.get("/studies/1.2..3").status_code == 400


# --- results in the index ------------------------------------------------------------------


def test_a_result_is_found_and_served_but_never_counts_as_received(tmp_path: Path) -> None:
    phantom = write_chest_ct(
        tmp_path / "phantom",
        Geometry(rows=16, columns=16, slices=4),
        seed=2,
        with_lung_series=False,
    )
    with web_client(tmp_path) as (client, ctx):
        assert (
            post(
                client, bearer(ctx, "integration"), [p.read_bytes() for p in phantom.files]
            ).status_code
            == 200
        )
        (study,) = index.list_studies(ctx.engine)
        done = index.mark_complete(
            ctx.engine, study.id, cutoff=time.time() + 1, now=time.time() + 1
        )
        assert done is not None
        before = (index.list_studies(ctx.engine)[0], series_facts(ctx.engine, study.id))

        sr = dcmread(real_file("test-SR.dcm"))
        sr.StudyInstanceUID = phantom.study_instance_uid
        sr.SeriesInstanceUID, sr.SOPInstanceUID = generate_uid(), generate_uid()
        sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
        buffer = io.BytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        relative = "results/1/SR.dcm"
        (ctx.settings.node.data_dir / relative).parent.mkdir(parents=True)
        (ctx.settings.node.data_dir / relative).write_bytes(data)
        header = read_header(data)
        assert index.record_result(ctx.engine, study.id, header, relative, len(data), "PACSAI", 5.0)
        assert not index.record_result(
            ctx.engine, study.id, header, relative, len(data), "PACSAI", 6.0
        )

        after = (index.list_studies(ctx.engine)[0], series_facts(ctx.engine, study.id))
        assert after == before  # state, counts, last_received_at and the rules' view unchanged
        assert after[0].state == COMPLETE

        read = bearer(ctx, "radiologist")
        (qido,) = client.get("/dicomweb/studies", headers=read).json()
        assert values(qido, "00080061") == ["CT", "SR"]
        assert values(qido, "00201208") == [len(phantom.files) + 1]
        (found,) = client.get("/dicomweb/series", params={"Modality": "SR"}, headers=read).json()
        assert values(found, "0020000E") == [sr.SeriesInstanceUID]
        wado = client.get(
            f"/dicomweb/studies/{sr.StudyInstanceUID}/series/{sr.SeriesInstanceUID}/instances/{sr.SOPInstanceUID}",
            headers=read,
        )
        ((_, body),) = read_parts(wado)
        assert body == data


def test_record_result_leaves_every_source_reader_alone(engine: Engine) -> None:
    source = read_header(real_file("CT_small.dcm").read_bytes())
    assert InstanceRecorder(engine).record(source, "MOD", "a/b/c.dcm", 10, now=100.0)
    (study,) = index.list_studies(engine)
    assert index.mark_complete(engine, study.id, cutoff=200.0, now=200.0) is not None
    before = (
        index.list_studies(engine),
        index.list_series(engine, study.id),
        index.instance_paths(engine, study.id),
        index.totals(engine),
        series_facts(engine, study.id),
    )
    sr = read_header(real_file("test-SR.dcm").read_bytes())
    assert index.record_result(engine, study.id, sr, "results/7/SR.dcm", 99, "PACSAI", 300.0)
    assert not index.record_result(engine, study.id, sr, "results/7/SR.dcm", 99, "PACSAI", 301.0)
    after = (
        index.list_studies(engine),
        index.list_series(engine, study.id),
        index.instance_paths(engine, study.id),
        index.totals(engine),
        series_facts(engine, study.id),
    )
    assert after == before
    assert after[0][0].state == COMPLETE and after[0][0].last_received_at == 100.0
    with engine.connect() as conn:
        kinds = dict(conn.execute(select(instances.c.sop_instance_uid, instances.c.kind)).all())
    assert kinds == {source.sop_instance_uid: "source", sr.sop_instance_uid: "result"}
