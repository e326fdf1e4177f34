"""Routing rules: declarative conditions, every matching rule fires, explain says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_ai.config import load_settings
from pacs_ai.errors import ConfigError
from pacs_ai.pipeline.route import (
    DEFAULT_RULES,
    Priority,
    RuleSettings,
    SeriesFacts,
    evaluate,
    explain,
)

CT_AXIAL = SeriesFacts(
    "1.2",
    "1.2.1",
    {
        "Modality": "CT",
        "SeriesDescription": "AXIAL 1.25 LUNG",
        "StudyDescription": "CT CHEST W/O",
        "Manufacturer": "SIEMENS",
        "BodyPartExamined": "CHEST",
        "ProtocolName": "CHEST ROUTINE",
        "CallingAETitle": "CT1",
        "SliceThickness": 1.25,
        "NumberOfSeriesRelatedInstances": 300,
        "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
    },
)
SCOUT = SeriesFacts(
    "1.2",
    "1.2.0",
    {
        **CT_AXIAL.values,
        "SeriesDescription": "SCOUT",
        "NumberOfSeriesRelatedInstances": 1,
        "ImageType": ("ORIGINAL", "PRIMARY", "LOCALIZER"),
    },
)
MR = SeriesFacts("1.3", "1.3.1", {**CT_AXIAL.values, "Modality": "MR"})


def rule(**kwargs: object) -> RuleSettings:
    return RuleSettings.model_validate({"name": "r", "models": ["m"], **kwargs})


@pytest.mark.parametrize(
    "match, fires",
    [
        ({"Modality": "CT"}, True),
        ({"Modality": "ct"}, False),  # a plain string is exact
        ({"Modality": {"iequals": "ct"}}, True),
        ({"StudyDescription": {"regex": "(?i)chest"}}, True),
        ({"SeriesDescription": {"regex": "^CORONAL"}}, False),
        ({"Manufacturer": {"in": ["GE", "SIEMENS"]}}, True),
        ({"SliceThickness": {"min": 0.5, "max": 1.5}}, True),
        ({"SliceThickness": {"max": 1.0}}, False),
        ({"NumberOfSeriesRelatedInstances": {"min": 301}}, False),
        ({"ImageType": {"contains": "AXIAL"}}, True),
        ({"ImageType": {"contains": ["AXIAL", "DERIVED"]}}, False),
        ({"ImageType": {"excludes": "LOCALIZER"}}, True),
        ({"CallingAETitle": "CT1", "BodyPartExamined": "CHEST"}, True),
        ({"CallingAETitle": "CT2"}, False),
    ],
)
def test_conditions(match: dict[str, object], fires: bool) -> None:
    assert bool(evaluate((rule(match=match),), [CT_AXIAL])) is fires


def test_every_matching_rule_fires() -> None:
    rules = (
        rule(name="organs", models=["ct-organs-threshold"], match={"Modality": "CT"}),
        rule(
            name="nodules",
            models=["lung-nodule-demo"],
            priority="STAT",
            match={"Modality": "CT", "SeriesDescription": {"regex": "LUNG"}},
        ),
        rule(name="mr-only", match={"Modality": "MR"}),
    )
    fired = evaluate(rules, [CT_AXIAL, MR])
    assert {(d.rule, d.series_instance_uid) for d in fired} == {
        ("organs", "1.2.1"),
        ("nodules", "1.2.1"),
        ("mr-only", "1.3.1"),
    }
    assert rules[1].priority is Priority.STAT and Priority.STAT.rank > Priority.ROUTINE.rank


def test_explain_names_the_deciding_condition() -> None:
    (decision,) = explain(
        (rule(match={"Modality": "CT", "NumberOfSeriesRelatedInstances": {"min": 20}}),), [SCOUT]
    )
    assert not decision.matched
    assert decision.deciding is not None
    assert decision.deciding.keyword == "NumberOfSeriesRelatedInstances"
    assert "1 < 20" in decision.deciding.reason


def test_default_rule_runs_organs_on_ct_series_of_twenty_slices() -> None:
    fired = evaluate(DEFAULT_RULES, [CT_AXIAL, SCOUT, MR])
    assert [(d.rule, d.series_instance_uid) for d in fired] == [("ct-organs", "1.2.1")]
    assert DEFAULT_RULES[0].models == ("ct-organs-threshold",) and not DEFAULT_RULES[0].results_to


def test_disabled_rule_never_fires() -> None:
    (decision,) = explain((rule(enabled=False),), [CT_AXIAL])
    assert not decision.matched and decision.deciding is not None
    assert decision.deciding.reason == "rule is disabled"


@pytest.mark.parametrize(
    "toml, key_fragment",
    [
        (
            '[[rules]]\nname = "a"\nmodels = ["m"]\nmatch = { Modalty = "CT" }\n',
            "unknown attribute",
        ),
        (
            '[[rules]]\nname = "a"\nmodels = ["m"]\n'
            'match = { SeriesDescription = { regex = "(" } }\n',
            "invalid regular expression",
        ),
        ('[[rules]]\nname = "a"\nmodels = ["m"]\npriority = "URGENT"\n', "rules[0].priority"),
        ('[[rules]]\nname = "a"\n', "neither runs a model nor forwards"),
        ('[[rules]]\nname = "a"\nforward = ["nowhere"]\n', "not a [[peers]] entry"),
        (
            '[[rules]]\nname = "a"\nmodels = ["m"]\nmatch = { Modality = { between = 1 } }\n',
            "between",
        ),
    ],
)
def test_bad_rules_are_configuration_errors(tmp_path: Path, toml: str, key_fragment: str) -> None:
    path = tmp_path / "pacs-ai.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert key_fragment in str(info.value)


def test_rules_from_file_replace_the_default(tmp_path: Path) -> None:
    path = tmp_path / "pacs-ai.toml"
    path.write_text(
        '[[peers]]\nname = "archive"\nae_title = "ARCH"\nhost = "127.0.0.1"\n'
        '[[rules]]\nname = "route-mr"\nforward = ["archive"]\nforward_level = "study"\n'
        'match = { Modality = "MR" }\n'
    )
    settings = load_settings(path)
    assert [r.name for r in settings.rules] == ["route-mr"]
    assert settings.rules[0].forward == ("archive",)
