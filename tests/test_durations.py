"""Durations as plans and settings write them: numbers of seconds or '250ms', '5s', '2m'."""

from __future__ import annotations

import math

import pytest
from pydantic import BaseModel, ValidationError

from cleveragents.durations import Duration, parse_duration


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        (0, 0.0),
        (5, 5.0),
        (2.5, 2.5),
        ("5", 5.0),
        ("0.25", 0.25),
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        (" 5 s ", 5.0),
        ("0ms", 0.0),
    ],
)
def test_parse_duration_accepts_seconds_and_units(given: object, seconds: float) -> None:
    assert parse_duration(given) == pytest.approx(seconds)
    assert isinstance(parse_duration(given), float)


@pytest.mark.parametrize(
    "given",
    ["", "s", "5 sec", "5d", "-1s", "1e3", "five", "5s5", "ms250", None, [5], {"s": 5}],
)
def test_parse_duration_rejects_what_is_not_a_duration(given: object) -> None:
    with pytest.raises(ValueError, match="expected a duration") as info:
        parse_duration(given)
    assert repr(given) in str(info.value)


@pytest.mark.parametrize("given", [True, False])
def test_parse_duration_rejects_booleans(given: bool) -> None:
    with pytest.raises(ValueError, match="boolean"):
        parse_duration(given)


@pytest.mark.parametrize("given", [-1, -0.001, math.inf, -math.inf, math.nan])
def test_parse_duration_rejects_negative_and_non_finite_numbers(given: float) -> None:
    with pytest.raises(ValueError, match="zero or more seconds"):
        parse_duration(given)


class _Settings(BaseModel):
    ttl: Duration


def test_duration_field_parses_strings_and_reports_bad_values() -> None:
    assert _Settings(ttl="250ms").ttl == pytest.approx(0.25)
    assert _Settings(ttl=3).ttl == 3.0
    with pytest.raises(ValidationError) as info:
        _Settings(ttl="soon")
    (error,) = info.value.errors()
    assert error["loc"] == ("ttl",)
    assert "expected a duration" in error["msg"]
