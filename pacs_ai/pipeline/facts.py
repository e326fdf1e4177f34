"""What routing rules see of a study, read from the index (the I/O half of routing)."""

from __future__ import annotations

from sqlalchemy import Engine, and_, func, select

from pacs_ai.pipeline.route import SeriesFacts
from pacs_ai.storage.schema import SOURCE, instances, series, studies


def series_facts(engine: Engine, study_id: int) -> list[SeriesFacts]:
    """One :class:`SeriesFacts` per series of a study reception, keyed by pydicom keyword."""
    query = (
        select(
            studies.c.study_instance_uid,
            studies.c.calling_ae,
            studies.c.study_description,
            studies.c.accession_number,
            series.c.id.label("series_id"),
            series.c.series_instance_uid,
            series.c.modality,
            series.c.series_number,
            series.c.series_description,
            series.c.body_part_examined,
            series.c.protocol_name,
            series.c.manufacturer,
            series.c.slice_thickness,
            series.c.image_type,
            func.count(instances.c.id).label("instance_count"),
        )
        .select_from(
            # Received instances only: the node's own SEG/SR series never meet the rules.
            series.join(studies, studies.c.id == series.c.study_id).join(
                instances, and_(instances.c.series_id == series.c.id, instances.c.kind == SOURCE)
            )
        )
        .where(series.c.study_id == study_id)
        .group_by(series.c.id, studies.c.id)
        .order_by(series.c.series_number, series.c.series_instance_uid)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        SeriesFacts(
            study_instance_uid=r.study_instance_uid,
            series_instance_uid=r.series_instance_uid,
            series_id=r.series_id,
            values={
                "Modality": r.modality,
                "BodyPartExamined": r.body_part_examined,
                "SeriesDescription": r.series_description,
                "ProtocolName": r.protocol_name,
                "Manufacturer": r.manufacturer,
                "StudyDescription": r.study_description,
                "AccessionNumber": r.accession_number,
                "CallingAETitle": r.calling_ae,
                "SliceThickness": r.slice_thickness,
                "SeriesNumber": r.series_number,
                "NumberOfSeriesRelatedInstances": int(r.instance_count),
                "ImageType": tuple(v for v in r.image_type.split("\\") if v),
            },
        )
        for r in rows
    ]
