"""The walked header (no dcmread) must say exactly what dcmread says, or step aside."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacs_ai.dicom import header
from pacs_ai.dicom.header import InstanceHeader, MalformedDataset
from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from tests.realdata import PYDICOM_FILES, part10_files, real_file

# pydicom's specific character set samples: ISO 2022 escapes, multi-byte sets, Arabic, ...
CHARSET_FILES = sorted((PYDICOM_FILES.parent / "charset_files").glob("*.dcm"))


def _outcome(read: object, data: bytes) -> InstanceHeader | str | None:
    try:
        return read(data)  # type: ignore[operator,no-any-return]
    except MalformedDataset as exc:
        return f"refused: {exc}"


@pytest.mark.parametrize("path", part10_files() + CHARSET_FILES, ids=lambda p: p.name)
def test_walked_header_equals_dcmread_on_real_files(path) -> None:  # type: ignore[no-untyped-def]
    data = path.read_bytes()
    walked = _outcome(header._read_walked, data)
    if walked is None or isinstance(walked, str):
        # Stepping aside is always allowed; read_header then gives dcmread's answer.
        assert _outcome(header.read_header, data) == _outcome(header._read_with_dcmread, data)
        return
    assert walked == header._read_with_dcmread(data)


def test_almost_every_real_file_takes_the_walked_path() -> None:
    files = part10_files() + CHARSET_FILES
    walked = [p.name for p in files if _outcome(header._read_walked, p.read_bytes())]
    assert len(files) > 100 and len(walked) >= len(files) - 8


def test_walked_header_equals_dcmread_on_the_phantom(tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_chest_ct(tmp_path, Geometry(slices=3), with_lung_series=False, with_scout=True)
    files = sorted(tmp_path.rglob("*.dcm"))
    assert files
    for path in files:
        data = path.read_bytes()
        walked = header._read_walked(data)
        assert walked is not None and walked == header._read_with_dcmread(data)


SAMPLES = [
    real_file(name).read_bytes()
    for name in (
        "CT_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "rtplan.dcm",
        "J2K_pixelrep_mismatch.dcm",
    )
] + [path.read_bytes() for path in CHARSET_FILES[:4]]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, len(SAMPLES) - 1),
    st.lists(st.tuples(st.integers(128, 1800), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_headers_are_read_as_dcmread_reads_them(
    sample: int, mutations: list[tuple[int, int]]
) -> None:
    data = bytearray(SAMPLES[sample])
    for offset, value in mutations:
        if offset < len(data):
            data[offset] = value
    raw = bytes(data)
    walked = _outcome(header._read_walked, raw)
    if walked is None:
        return
    expected = _outcome(header._read_with_dcmread, raw)
    if isinstance(walked, str):
        # The walk refused: so does dcmread's path, which read_header then reports.
        assert isinstance(expected, str)
    else:
        assert walked == expected
    assert _outcome(header.read_header, raw) == expected


def test_random_truncations_agree() -> None:
    rng = random.Random(7)
    for data in SAMPLES:
        for _ in range(40):
            cut = rng.randrange(132, len(data))
            assert _outcome(header.read_header, data[:cut]) == _outcome(
                header._read_with_dcmread, data[:cut]
            )
