"""What QIDO-RS can match on and return, level by level, and where the index keeps it.

An attribute with a column is matched in SQL and read from the index; the few computed ones
(counts, ModalitiesInStudy) come from aggregate queries. Instance attributes the index does
not hold can still be returned on request, read from the stored file's header.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from pacs_ai.storage.schema import instances, series, studies


class Level(IntEnum):
    STUDY = 0
    SERIES = 1
    INSTANCE = 2


@dataclass(frozen=True)
class Attribute:
    keyword: str
    vr: str
    level: Level
    # The index column, or None for a value the search computes.
    column: Any = None
    # Returned without being asked for (PS3.18 Table 10.6.3-3/-4/-5, as far as the index holds).
    default: bool = True


_ATTRIBUTES = (
    # study (PS3.18 Table 10.6.3-3)
    Attribute("StudyInstanceUID", "UI", Level.STUDY, studies.c.study_instance_uid),
    Attribute("StudyDate", "DA", Level.STUDY, studies.c.study_date),
    Attribute("StudyTime", "TM", Level.STUDY, studies.c.study_time),
    Attribute("AccessionNumber", "SH", Level.STUDY, studies.c.accession_number),
    Attribute("ReferringPhysicianName", "PN", Level.STUDY, studies.c.referring_physician_name),
    Attribute("PatientName", "PN", Level.STUDY, studies.c.patient_name),
    Attribute("PatientID", "LO", Level.STUDY, studies.c.patient_id),
    Attribute("PatientBirthDate", "DA", Level.STUDY, studies.c.patient_birth_date),
    Attribute("PatientSex", "CS", Level.STUDY, studies.c.patient_sex),
    Attribute("StudyDescription", "LO", Level.STUDY, studies.c.study_description),
    # Required in the answer, not kept by the index: returned empty (Type 2 style).
    Attribute("StudyID", "SH", Level.STUDY),
    Attribute("ModalitiesInStudy", "CS", Level.STUDY),
    Attribute("NumberOfStudyRelatedSeries", "IS", Level.STUDY),
    Attribute("NumberOfStudyRelatedInstances", "IS", Level.STUDY),
    # series (PS3.18 Table 10.6.3-4)
    Attribute("SeriesInstanceUID", "UI", Level.SERIES, series.c.series_instance_uid),
    Attribute("Modality", "CS", Level.SERIES, series.c.modality),
    Attribute("SeriesNumber", "IS", Level.SERIES, series.c.series_number),
    Attribute("SeriesDescription", "LO", Level.SERIES, series.c.series_description),
    Attribute("BodyPartExamined", "CS", Level.SERIES, series.c.body_part_examined, False),
    Attribute("ProtocolName", "LO", Level.SERIES, series.c.protocol_name, False),
    Attribute("Manufacturer", "LO", Level.SERIES, series.c.manufacturer, False),
    Attribute("SliceThickness", "DS", Level.SERIES, series.c.slice_thickness, False),
    Attribute("NumberOfSeriesRelatedInstances", "IS", Level.SERIES),
    # instance (PS3.18 Table 10.6.3-5); Rows, Columns ... come from the file on request
    Attribute("SOPClassUID", "UI", Level.INSTANCE, instances.c.sop_class_uid),
    Attribute("SOPInstanceUID", "UI", Level.INSTANCE, instances.c.sop_instance_uid),
    Attribute("InstanceNumber", "IS", Level.INSTANCE, instances.c.instance_number),
    Attribute("AvailableTransferSyntaxUID", "UI", Level.INSTANCE, instances.c.transfer_syntax_uid),
)

ATTRIBUTES: dict[str, Attribute] = {a.keyword: a for a in _ATTRIBUTES}

# Required instance attributes that only the file holds: returned with includefield=all.
FILE_DEFAULTS = ("Rows", "Columns", "BitsAllocated", "NumberOfFrames")


def at_levels(levels: frozenset[Level]) -> list[Attribute]:
    return [a for a in _ATTRIBUTES if a.level in levels]
