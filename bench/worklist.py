"""Worklist API and QIDO-RS study search latency with 10,000 studies, on SQLite and PostgreSQL.

The node's index is filled directly (studies, series, instances and jobs rows shaped like a
busy site's: CT/MR/CR mixes, STAT/HIGH/ROUTINE priorities, findings, reviews pending), then
a real ``pacs-ai serve`` answers over HTTP while this script times each request from the
client side (httpx, keep-alive, one request at a time):

    worklist first page       GET /api/worklist
    worklist filtered         GET /api/worklist?priority=STAT&modality=CT
    worklist deep page        GET /api/worklist?offset=9000
    QIDO patient ID wildcard  GET /dicomweb/studies?PatientID=ID0012*
    QIDO date range           GET /dicomweb/studies?StudyDate=20250101-20250131&limit=100
    QIDO by UID               GET /dicomweb/studies?StudyInstanceUID=<one>

With ``--orthanc`` (default when Orthanc is installed) the same 10,000 studies, as small
instances, go into a real Orthanc with its DICOMweb plugin, and the QIDO queries run against
it too; the ratio column is Orthanc's p50 over ours (> 1 means pacs-ai answers faster).

Run: ``.venv/bin/python bench/worklist.py [--studies 10000] [--requests 200]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from sqlalchemy import Engine, insert

from pacs_ai.storage.db import open_database
from pacs_ai.storage.schema import instances, jobs, series, studies
from tests.peers import ORTHANC, NodeProcess, OrthancProcess

MODALITIES = ("CT", "CT", "CT", "MR", "CR")
PRIORITIES = (("STAT", 9), ("HIGH", 6), ("ROUTINE", 3), ("ROUTINE", 3), ("ROUTINE", 3))
JOB_STATES = ("DELIVERED", "DELIVERED", "DELIVERED", "QUEUED", "RUNNING", "FAILED", "SKIPPED")
UID_ROOT = "1.2.826.0.1.3680043.10.1411.9"


def study_uid(i: int) -> str:
    return f"{UID_ROOT}.{i}"


def study_date(i: int) -> str:
    day = time.gmtime(1704067200 + (i % 730) * 86400)  # two years from 2024-01-01
    return time.strftime("%Y%m%d", day)


def populate(engine: Engine, count: int, seed: int = 7) -> None:
    """``count`` complete studies, each one series of 3 instances and one job."""
    rng = random.Random(seed)
    now = time.time() - count
    batch = 1000
    for start in range(0, count, batch):
        ids = range(start, min(count, start + batch))
        with engine.begin() as conn:
            study_rows = []
            for i in ids:
                priority, rank = PRIORITIES[rng.randrange(len(PRIORITIES))]
                study_rows.append(
                    {
                        "id": i + 1,
                        "study_instance_uid": study_uid(i),
                        "calling_ae": "BENCH",
                        "state": "COMPLETE",
                        "patient_id": f"ID{i:06d}",
                        "patient_name": f"BENCH^P{i}",
                        "patient_birth_date": "19600101",
                        "patient_sex": "O",
                        "accession_number": f"A{i:07d}",
                        "study_date": study_date(i),
                        "study_time": "101500",
                        "study_description": "CT CHEST" if i % 2 else "MR BRAIN",
                        "referring_physician_name": "",
                        "first_received_at": now + i,
                        "last_received_at": now + i,
                        "completed_at": now + i + 30,
                        "series_count": 1,
                        "instance_count": 3,
                        "completions": 1,
                        "reopened": 0,
                        "priority": priority,
                        "priority_rank": rank,
                        "findings_summary": "bench-model: 1 finding" if rank == 9 else "",
                        "review_state": "UNREVIEWED",
                    }
                )
            conn.execute(insert(studies), study_rows)
            conn.execute(
                insert(series),
                [
                    {
                        "id": i + 1,
                        "study_id": i + 1,
                        "series_instance_uid": f"{study_uid(i)}.1",
                        "modality": MODALITIES[i % len(MODALITIES)],
                        "series_number": 1,
                        "series_description": "AXIAL",
                        "body_part_examined": "CHEST",
                        "protocol_name": "",
                        "manufacturer": "BENCH",
                        "slice_thickness": 1.0,
                        "image_type": "ORIGINAL\\PRIMARY\\AXIAL",
                        "first_received_at": now + i,
                    }
                    for i in ids
                ],
            )
            conn.execute(
                insert(instances),
                [
                    {
                        "sop_instance_uid": f"{study_uid(i)}.1.{n}",
                        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                        "series_id": i + 1,
                        "study_id": i + 1,
                        "instance_number": n,
                        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                        "path": f"{study_uid(i)}/{study_uid(i)}.1/{study_uid(i)}.1.{n}.dcm",
                        "size_bytes": 526_000,
                        "calling_ae": "BENCH",
                        "received_at": now + i,
                        "duplicates": 0,
                    }
                    for i in ids
                    for n in (1, 2, 3)
                ],
            )
            conn.execute(
                insert(jobs),
                [
                    {
                        "study_id": i + 1,
                        "series_id": i + 1,
                        "model": "ct-organs-threshold",
                        "rule": "ct-organs",
                        "priority": "ROUTINE",
                        "state": JOB_STATES[i % len(JOB_STATES)],
                        "reason": "",
                        "attempts": 1,
                        "max_attempts": 3,
                        "destinations": "",
                        "created_at": now + i,
                        "updated_at": now + i,
                        "timings": "{}",
                        "findings": json.dumps(
                            {"present": None, "findings": [{"name": "lungs", "volume_ml": 4000}]}
                        ),
                        "completion": 1,
                    }
                    for i in ids
                ],
            )


def tiny_instance(i: int) -> bytes:
    """The Orthanc twin of study ``i``: one small CT image with the same study attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = f"{study_uid(i)}.1.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid(i)
    ds.SeriesInstanceUID = f"{study_uid(i)}.1"
    ds.PatientName = f"BENCH^P{i}"
    ds.PatientID = f"ID{i:06d}"
    ds.AccessionNumber = f"A{i:07d}"
    ds.StudyDate = study_date(i)
    ds.StudyTime = "101500"
    ds.StudyDescription = "CT CHEST" if i % 2 else "MR BRAIN"
    ds.Modality = MODALITIES[i % len(MODALITIES)]
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(128)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def queries(count: int) -> dict[str, tuple[str, dict[str, str]]]:
    probe = study_uid(count // 2)
    return {
        "worklist first page": ("/api/worklist", {}),
        "worklist filtered": ("/api/worklist", {"priority": "STAT", "modality": "CT"}),
        "worklist deep page": ("/api/worklist", {"offset": str(max(0, count - 1000))}),
        "QIDO patient ID wildcard": ("/dicomweb/studies", {"PatientID": "ID0012*"}),
        "QIDO date range": (
            "/dicomweb/studies",
            {"StudyDate": "20250101-20250131", "limit": "100"},
        ),
        "QIDO by UID": ("/dicomweb/studies", {"StudyInstanceUID": probe}),
    }


def measure(
    client: httpx.Client, path: str, params: dict[str, str], requests: int
) -> tuple[float, float, int]:
    """p50 and p95 in milliseconds, and the number of results of the last answer."""
    found = 0
    for _ in range(5):  # warm caches and the connection
        client.get(path, params=params)
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(path, params=params)
        samples.append((time.perf_counter() - started) * 1000)
        if response.status_code not in (200, 204):
            raise SystemExit(f"{path} answered {response.status_code}: {response.text[:300]}")
    if response.status_code == 200:
        body = response.json()
        found = len(body["items"]) if isinstance(body, dict) else len(body)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))], found


@contextmanager
def node_over(database_url: str, workdir: Path, count: int) -> Iterator[NodeProcess]:
    engine = open_database(database_url)
    started = time.perf_counter()
    populate(engine, count)
    engine.dispose()
    print(f"  {count} studies written to the index in {time.perf_counter() - started:.1f} s")
    node = NodeProcess(workdir, database_url=database_url)
    node.start()
    try:
        yield node
    finally:
        node.stop()


@contextmanager
def orthanc_with(count: int, workdir: Path) -> Iterator[OrthancProcess]:
    orthanc = OrthancProcess(workdir, dicomweb=True).start()
    try:
        started = time.perf_counter()
        with httpx.Client(base_url=orthanc.url, timeout=60) as client:
            for i in range(count):
                response = client.post("/instances", content=tiny_instance(i))
                response.raise_for_status()
        print(f"  {count} studies stored in Orthanc in {time.perf_counter() - started:.1f} s")
        yield orthanc
    finally:
        orthanc.stop()


def run(args: argparse.Namespace) -> None:
    variants: list[tuple[str, Any]] = [("SQLite", None)]
    if not args.no_postgres:
        variants.append(("PostgreSQL", "postgres"))
    results: dict[str, dict[str, tuple[float, float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="pacs-ai-bench-") as tmp:
        root = Path(tmp)
        for label, kind in variants:
            print(f"{label}:")
            with ExitStack() as stack:
                if kind == "postgres":
                    try:
                        from tests.databases import postgres_database

                        url = stack.enter_context(postgres_database())
                    except BaseException as exc:  # pytest.skip is a BaseException
                        print(f"  skipped: no PostgreSQL ({exc})")
                        continue
                else:
                    url = f"sqlite:///{root / 'sqlite' / 'index.sqlite3'}"
                node = stack.enter_context(node_over(url, root / label, args.studies))
                token = node.token("admin", name="bench")
                headers = {"Authorization": f"Bearer {token}"}
                with httpx.Client(base_url=node.url, headers=headers, timeout=60) as client:
                    results[label] = {
                        name: measure(client, path, params, args.requests)
                        for name, (path, params) in queries(args.studies).items()
                    }
        if args.orthanc:
            print("Orthanc:")
            with (
                orthanc_with(args.studies, root / "orthanc") as orthanc,
                httpx.Client(base_url=orthanc.url + "/dicom-web", timeout=60) as client,
            ):
                results["Orthanc"] = {
                    name: measure(client, path.removeprefix("/dicomweb"), params, args.requests)
                    for name, (path, params) in queries(args.studies).items()
                    if path.startswith("/dicomweb")
                }
    report(results, args)


def report(
    results: dict[str, dict[str, tuple[float, float, int]]], args: argparse.Namespace
) -> None:
    print(f"\n{args.studies} studies, {args.requests} requests per query (ms, client side)")
    names = list(queries(args.studies))
    header = f"{'query':<24}" + "".join(f"{label + ' p50/p95':>22}" for label in results)
    if "Orthanc" in results:
        header += f"{'Orthanc/SQLite p50':>20}"
    print(header)
    for name in names:
        line = f"{name:<24}"
        for label in results:
            if name in results[label]:
                p50, p95, found = results[label][name]
                line += f"{f'{p50:.1f}/{p95:.1f} ({found})':>22}"
            else:
                line += f"{'-':>22}"
        if "Orthanc" in results and name in results["Orthanc"] and "SQLite" in results:
            ours, theirs = results["SQLite"][name], results["Orthanc"][name]
            if ours[2] != theirs[2]:
                # Not the same answer, so not the same work: no ratio. (Orthanc 1.10's
                # DICOMweb plugin matched no study for a PatientID wildcard here.)
                line += f"{'answers differ':>20}"
            else:
                line += f"{theirs[0] / ours[0]:>19.2f}x"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument(
        "--orthanc",
        action=argparse.BooleanOptionalAction,
        default=Path(ORTHANC).exists(),
        help="also time QIDO-RS on a real Orthanc holding the same studies",
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
