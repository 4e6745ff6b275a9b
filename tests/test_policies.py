"""Policies and windows: scope keys, trading days from the exchange calendar, validation."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from orderguard import (
    Bucket,
    CalendarDay,
    ClockError,
    Cooldown,
    Cycle,
    Ever,
    InvalidPolicy,
    MaxOpen,
    OncePer,
    OneOpen,
    TradingDay,
)
from orderguard.policies import ScopeKind, as_policies
from tests.helpers import make_intent


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("moment", "session"),
    [
        ("2026-11-20 15:00", "2026-11-20"),  # Friday, market open
        ("2026-11-20 13:00", "2026-11-20"),  # Friday before the open: that day's session
        ("2026-11-20 22:00", "2026-11-23"),  # Friday after the close: Monday
        ("2026-11-21 15:00", "2026-11-23"),  # Saturday: Monday
        ("2026-11-26 15:00", "2026-11-27"),  # Thanksgiving (closed): Friday
        ("2026-12-24 19:30", "2026-12-28"),  # Christmas Eve after the early close, then Christmas
    ],
)
def test_trading_day_maps_outside_hours_to_the_next_session(moment: str, session: str) -> None:
    assert TradingDay("XNYS").key(utc(moment)) == f"XNYS:{session}"


def test_trading_day_outside_calendar_range_fails_closed() -> None:
    with pytest.raises(ClockError, match="outside the XNYS calendar's range"):
        TradingDay("XNYS").key(utc("2099-01-02 15:00"))


def test_unknown_calendar_and_zone_are_invalid_policies() -> None:
    with pytest.raises(InvalidPolicy, match="NOPE"):
        TradingDay("NOPE")
    with pytest.raises(InvalidPolicy, match="Mars/Base"):
        CalendarDay("Mars/Base")


def test_calendar_day_uses_the_zone() -> None:
    moment = utc("2026-11-21 03:00")  # still the 20th in New York
    assert CalendarDay("America/New_York").key(moment) == "2026-11-20@America/New_York"
    assert CalendarDay("UTC").key(moment) == "2026-11-21@UTC"


def test_bucket_cycle_ever() -> None:
    assert Bucket(60).key(utc("2026-11-20 15:00:59")) == Bucket(60).key(utc("2026-11-20 15:00:00"))
    assert Bucket(60).key(utc("2026-11-20 15:01:00")) != Bucket(60).key(utc("2026-11-20 15:00:59"))
    assert Cycle("run 7").key(utc("2026-11-20 15:00")) == "cycle:run%207"
    assert Ever().key(utc("2026-11-20 15:00")) == Ever().key(utc("2030-01-01 00:00"))


def test_scope_keys_use_the_named_fields_only() -> None:
    policy = OncePer(Ever(), by=("strategy", "symbol"))
    a = policy.rule(make_intent(quantity=4), utc("2026-11-20 15:00"))
    b = policy.rule(make_intent(quantity=9, account="other"), utc("2026-11-20 15:00"))
    c = policy.rule(make_intent(symbol="NDX"), utc("2026-11-20 15:00"))
    assert a.key == b.key == "once|strategy=spx-calendar|symbol=SPX|@ever"
    assert a.key != c.key
    assert a.kind is ScopeKind.ONCE


def test_scope_key_values_are_escaped() -> None:
    rule = OneOpen(by=("symbol",)).rule(make_intent(symbol="A|B=C"), utc("2026-11-20 15:00"))
    assert rule.key == "open|symbol=A%7CB%3DC"


def test_tag_fields_in_by() -> None:
    rule = Cooldown(60, by=("strategy", "tags.leg")).rule(make_intent(tags={"leg": "front"}), utc("2026-11-20 15:00"))
    assert rule.key == "cooldown|strategy=spx-calendar|tags.leg=front"
    assert rule.seconds == 60


@pytest.mark.parametrize(
    "make",
    [
        lambda: OncePer(Ever(), by=("colour",)),
        lambda: OncePer(Ever(), by=()),
        lambda: OncePer(Ever(), by=("symbol", "symbol")),
        lambda: OncePer("today"),  # type: ignore[arg-type]
        lambda: Cooldown(0),
        lambda: Cooldown(-5),
        lambda: Cooldown(float("nan")),
        lambda: MaxOpen(0),
        lambda: MaxOpen(True),  # type: ignore[arg-type]
        lambda: Bucket(0),
        lambda: Cycle(""),
        lambda: as_policies(None),
        lambda: as_policies([]),
        lambda: as_policies(["OneOpen"]),  # type: ignore[list-item]
    ],
)
def test_bad_policies_are_refused(make: object) -> None:
    with pytest.raises(InvalidPolicy):
        make()  # type: ignore[operator]


def test_one_open_is_max_open_one() -> None:
    rule = OneOpen().rule(make_intent(), utc("2026-11-20 15:00"))
    assert rule.kind is ScopeKind.OPEN
    assert rule.limit == 1
