"""Real DICOM files the project did not make: pydicom's test files and pydicom-data.

Both ship inside installed packages; we read them from there and never download
(``pydicom.data.get_testdata_file`` would try the network for files it lacks).
"""

from __future__ import annotations

from pathlib import Path

import data_store
import pydicom

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_DATA_FILES = Path(data_store.__file__).parent / "data"


def real_file(name: str) -> Path:
    for folder in (PYDICOM_FILES, PYDICOM_DATA_FILES):
        path = folder / name
        if path.exists():
            return path
    raise FileNotFoundError(f"{name} is in neither pydicom's test files nor pydicom-data")


def part10_files() -> list[Path]:
    """Every real file with a Part 10 header (preamble + DICM), sorted by name."""
    files = sorted(PYDICOM_FILES.glob("*.dcm")) + sorted(PYDICOM_DATA_FILES.glob("*.dcm"))
    return [p for p in files if _has_dicm(p)]


def _has_dicm(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def dataset_bytes(data: bytes) -> bytes:
    """The data set part of a Part 10 byte string: what a DIMSE peer actually sends."""
    import struct

    group_length = struct.unpack_from("<I", data, 140)[0]
    return data[144 + group_length :]


# A spread of real modalities and transfer syntaxes that a PACS would send.
TRANSFER_SYNTAX_SAMPLES = {
    "CT_small.dcm": "1.2.840.10008.1.2.1",  # explicit VR little endian, CT
    "MR_small_implicit.dcm": "1.2.840.10008.1.2",  # implicit VR little endian, MR
    "MR_small_bigendian.dcm": "1.2.840.10008.1.2.2",  # explicit VR big endian
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "JPEG-LL.dcm": "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "US1_J2KR.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless, ultrasound
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE lossless
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "emri_small_jpeg_2k_lossless.dcm": "1.2.840.10008.1.2.4.90",  # multi-frame MR
}
