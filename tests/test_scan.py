"""What `pacs-ai send` and deliveries read of each file before sending it."""

from __future__ import annotations

from pathlib import Path

import pydicom

from pacs_ai.dicom.scu import SendReport, scan
from tests.realdata import real_file


def test_a_file_whose_meta_names_no_instance_is_skipped_with_the_reason(tmp_path: Path) -> None:
    good = tmp_path / "good.dcm"
    good.write_bytes(real_file("CT_small.dcm").read_bytes())
    nameless = tmp_path / "nameless.dcm"
    ds = pydicom.dcmread(good)
    del ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(nameless, enforce_file_format=False)

    report = SendReport()
    (found,) = scan([tmp_path], report)
    assert found.path == good and found.sop_instance_uid == ds.SOPInstanceUID
    ((path, reason),) = report.skipped
    # Storage commitment names every sent instance by this Type 1 element.
    assert path == nameless and "MediaStorageSOPInstanceUID" in reason
