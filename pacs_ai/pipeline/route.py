"""Routing rules: which models run on which series, what is forwarded where, and how urgently.

Rules are data in the node's configuration, never code. A rule matches a series when every
condition in its ``match`` table holds; **every** matching rule fires (rules do not stop at
the first match), so one series may run several models and be forwarded to several peers.

Conditions are keyed by pydicom keyword (DICOM's own vocabulary) and take one of these forms::

    Modality = "CT"                                   exact (case-sensitive) string
    StudyDescription = { iequals = "ct chest" }       case-insensitive string
    SeriesDescription = { regex = "(?i)axial.*lung" } regular expression (search)
    Manufacturer = { in = ["SIEMENS", "GE"] }          one of several exact strings
    SliceThickness = { min = 0.5, max = 2.5 }         numeric range, inclusive
    NumberOfSeriesRelatedInstances = { min = 20 }     the series' instance count
    ImageType = { contains = "AXIAL", excludes = "LOCALIZER" }   multi-valued attributes
    CallingAETitle = "CT_SCANNER_1"                   who sent the study

:func:`evaluate` and :func:`explain` are pure: they take series facts and return decisions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Priority(StrEnum):
    """Queue order for a rule's jobs; STAT jumps ahead of everything."""

    STAT = "STAT"
    HIGH = "HIGH"
    ROUTINE = "ROUTINE"

    @property
    def rank(self) -> int:
        """Higher is more urgent (for sorting and display)."""
        return {"STAT": 9, "HIGH": 6, "ROUTINE": 3}[self.value]

    @property
    def celery_priority(self) -> int:
        """Celery's Redis transport serves priority 0 first, so the scale is inverted."""
        return 9 - self.rank


# Series-level facts a rule may test, by keyword. Study-level ones apply to every series.
STRING_KEYWORDS = frozenset(
    {
        "Modality",
        "BodyPartExamined",
        "SeriesDescription",
        "ProtocolName",
        "Manufacturer",
        "StudyDescription",
        "AccessionNumber",
        "CallingAETitle",
    }
)
NUMERIC_KEYWORDS = frozenset({"SliceThickness", "NumberOfSeriesRelatedInstances", "SeriesNumber"})
MULTI_KEYWORDS = frozenset({"ImageType"})
KEYWORDS = STRING_KEYWORDS | NUMERIC_KEYWORDS | MULTI_KEYWORDS


class Condition(BaseModel):
    """One test on one attribute; exactly the operators that fit the attribute's kind."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    equals: str | None = None
    iequals: str | None = None
    regex: str | None = None
    in_: tuple[str, ...] | None = Field(None, alias="in")
    min: float | None = None
    max: float | None = None
    contains: tuple[str, ...] | None = None
    excludes: tuple[str, ...] | None = None

    @field_validator("contains", "excludes", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Condition:
        if not self.model_dump(exclude_none=True):
            raise ValueError("a condition needs at least one operator")
        return self

    def test(self, value: Any) -> tuple[bool, str]:
        """Whether ``value`` passes, and the reason in words."""
        if self.equals is not None and value != self.equals:
            return False, f"{value!r} != {self.equals!r}"
        if self.iequals is not None and str(value).casefold() != self.iequals.casefold():
            return False, f"{value!r} is not {self.iequals!r} (ignoring case)"
        if self.regex is not None and not re.search(self.regex, str(value or "")):
            return False, f"{value!r} does not match /{self.regex}/"
        if self.in_ is not None and value not in self.in_:
            return False, f"{value!r} not in {list(self.in_)}"
        if self.min is not None or self.max is not None:
            if value is None:
                return False, "no value"
            number = float(value)
            if self.min is not None and number < self.min:
                return False, f"{number:g} < {self.min:g}"
            if self.max is not None and number > self.max:
                return False, f"{number:g} > {self.max:g}"
        values = set(value) if isinstance(value, (tuple, list, frozenset, set)) else {value}
        for needed in self.contains or ():
            if needed not in values:
                return False, f"{needed!r} not among {sorted(values)}"
        for banned in self.excludes or ():
            if banned in values:
                return False, f"{banned!r} is among {sorted(values)}"
        return True, f"{value!r} passes"


def _as_condition(keyword: str, value: Any) -> Condition:
    if isinstance(value, Condition):
        return value
    if isinstance(value, dict):
        return Condition.model_validate(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Condition(min=value, max=value)
    if isinstance(value, str):
        if keyword in MULTI_KEYWORDS:
            return Condition(contains=(value,))
        return Condition(equals=value)
    raise ValueError(f"{keyword}: use a string, a number or a table of operators")


class Escalation(BaseModel):
    """``escalate = [{ finding = "nodule", min_certainty = 0.8, priority = "STAT" }]``.

    When a job of the rule reports a finding whose name contains ``finding`` (ignoring case)
    with at least ``min_certainty`` (any certainty when unset), the study's worklist priority
    rises to ``priority``. It never lowers a priority.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    finding: Annotated[str, Field(min_length=1)]
    min_certainty: float | None = Field(None, ge=0, le=1)
    priority: Priority = Priority.STAT

    def raises(self, name: str, certainty: float | None) -> bool:
        if self.finding.casefold() not in name.casefold():
            return False
        if self.min_certainty is None:
            return True
        return certainty is not None and certainty >= self.min_certainty


class RuleSettings(BaseModel):
    """``[[rules]]``: when a series matches, run these models, forward there, at this priority."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    match: dict[str, Condition] = Field(default_factory=dict)
    models: tuple[str, ...] = ()
    forward: tuple[str, ...] = ()
    forward_level: str = Field("series", pattern="^(series|study)$")
    results_to: tuple[str, ...] = ()
    """Peer names for results; empty means the peer the study came from, if it may receive."""
    priority: Priority = Priority.ROUTINE
    escalate: tuple[Escalation, ...] = ()
    """Findings that raise the study's worklist priority (see :class:`Escalation`)."""
    enabled: bool = True

    @field_validator("match", mode="before")
    @classmethod
    def _conditions(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        unknown = sorted(set(value) - KEYWORDS)
        if unknown:
            raise ValueError(f"unknown attribute(s) {unknown}; rules can test {sorted(KEYWORDS)}")
        return {k: _as_condition(k, v) for k, v in value.items()}

    @model_validator(mode="after")
    def _does_something(self) -> RuleSettings:
        if not self.models and not self.forward:
            raise ValueError(f"rule {self.name!r} neither runs a model nor forwards anything")
        return self


DEFAULT_RULES = (
    RuleSettings(
        name="ct-organs",
        match={
            "Modality": Condition(equals="CT"),
            "NumberOfSeriesRelatedInstances": Condition(min=20),
            "ImageType": Condition(excludes=("LOCALIZER",)),
        },
        models=("ct-organs-threshold",),
    ),
)
"""What a node runs when its configuration names no rules: CT series of 20+ slices get
``ct-organs-threshold``, results back to the sender. Any ``[[rules]]`` replace it."""


@dataclass(frozen=True)
class SeriesFacts:
    """What a rule can see of one series (and its study), by pydicom keyword."""

    study_instance_uid: str
    series_instance_uid: str
    values: dict[str, Any]
    series_id: int = 0
    """The index row, when the facts came from the index."""


@dataclass(frozen=True)
class ConditionResult:
    keyword: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class Decision:
    rule: str
    series_instance_uid: str
    matched: bool
    conditions: tuple[ConditionResult, ...]

    @property
    def deciding(self) -> ConditionResult | None:
        """The first failed condition (why it did not match), or None when it matched."""
        return next((c for c in self.conditions if not c.passed), None)


def explain_one(rule: RuleSettings, series: SeriesFacts) -> Decision:
    results = []
    for keyword, condition in rule.match.items():
        passed, reason = condition.test(series.values.get(keyword))
        results.append(ConditionResult(keyword, passed, reason))
    matched = rule.enabled and all(r.passed for r in results)
    if not rule.enabled:
        results.append(ConditionResult("enabled", False, "rule is disabled"))
    return Decision(rule.name, series.series_instance_uid, matched, tuple(results))


def explain(rules: tuple[RuleSettings, ...], series: list[SeriesFacts]) -> list[Decision]:
    """Every rule against every series, with the conditions that decided."""
    return [explain_one(rule, s) for s in series for rule in rules]


def evaluate(rules: tuple[RuleSettings, ...], series: list[SeriesFacts]) -> list[Decision]:
    """Only the decisions that fire."""
    return [d for d in explain(rules, series) if d.matched]
