"""Policies: what "duplicate" means for a strategy.

A policy turns an intent (and the store's clock) into a :class:`ScopeRule`: a scope key built
from intent fields (``by=``) and, for :class:`OncePer`, a window key. The store then takes the
scope with one conditional write. Several policies may guard one claim; the first that blocks
gives the reason.
"""

from __future__ import annotations

import re
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ClockError, InvalidPolicy
from .intent import INTENT_FIELDS, OrderIntent

DEFAULT_BY: tuple[str, ...] = ("account", "strategy", "symbol", "side")


class ScopeKind(StrEnum):
    """How the store arbitrates a scope."""

    ONCE = "once"  # one executed intent per key (the key carries the window)
    COOLDOWN = "cooldown"  # one intent per key per N seconds
    OPEN = "open"  # at most N open intents per key


@dataclass(frozen=True)
class ScopeRule:
    """A policy applied to one intent at one instant: what the store must arbitrate."""

    kind: ScopeKind
    key: str
    policy: str  # the policy as written, for messages
    limit: int = 1  # OPEN: how many may be open at once
    seconds: float = 0.0  # COOLDOWN: the quiet period
    base: str = ""  # ONCE with a rolling window: the key up to its window ("once|...|@")


# ---------------------------------------------------------------------------------- windows


class Window(ABC):
    """A period in which :class:`OncePer` allows one executed intent per scope."""

    @abstractmethod
    def key(self, now: datetime) -> str:
        """The window's key for the instant ``now`` (an aware UTC datetime)."""


class TradingDay(Window):
    """A session of an exchange calendar (``exchange-calendars`` names, e.g. ``"XNYS"``).

    A claim outside a session (night, weekend, holiday) belongs to the next session, so a
    Sunday-evening job and Monday's 09:45 job compete for the same slot.
    """

    def __init__(self, calendar: str) -> None:
        import exchange_calendars  # heavy (pandas): only loaded when a trading day is used

        with warnings.catch_warnings():
            # pandas 3 deprecation noise from exchange-calendars' lazy indexes, built here once
            # (catch_warnings is not thread-safe, so the claim path never uses it).
            warnings.simplefilter("ignore")
            try:
                self._calendar: Any = exchange_calendars.get_calendar(calendar)
            except Exception as exc:  # InvalidCalendarName and friends
                raise InvalidPolicy(f"unknown exchange calendar {calendar!r}: {exc}") from None
            self._calendar.minute_to_session(self._calendar.first_minute, direction="next")
        self.calendar = calendar
        self._cache_lock = threading.Lock()
        self._cached_minute = -1
        self._cached_key = ""

    def key(self, now: datetime) -> str:
        minute = int(now.timestamp() // 60)
        with self._cache_lock:
            if minute == self._cached_minute:
                return self._cached_key
        import pandas as pd

        try:
            session = self._calendar.minute_to_session(
                pd.Timestamp(minute * 60, unit="s", tz="UTC"), direction="next"
            )
        except Exception as exc:  # outside the calendar's bounds
            raise ClockError(
                f"{now.isoformat()} is outside the {self.calendar} calendar's range "
                f"({self._calendar.first_session.date()}..{self._calendar.last_session.date()}): "
                f"check the clock or upgrade exchange-calendars ({exc})"
            ) from None
        key = f"{self.calendar}:{session.date().isoformat()}"
        with self._cache_lock:
            self._cached_minute, self._cached_key = minute, key
        return key

    def __repr__(self) -> str:
        return f"TradingDay({self.calendar!r})"


class CalendarDay(Window):
    """A calendar day in a time zone (midnight to midnight there)."""

    def __init__(self, tz: str = "UTC") -> None:
        try:
            self._zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidPolicy(f"unknown time zone {tz!r}") from None
        self.tz = tz

    def key(self, now: datetime) -> str:
        return f"{now.astimezone(self._zone).date().isoformat()}@{self.tz}"

    def __repr__(self) -> str:
        return f"CalendarDay({self.tz!r})"


class Cycle(Window):
    """A caller-defined cycle: one executed intent per scope per cycle id."""

    def __init__(self, id: str) -> None:
        if not isinstance(id, str) or not id or len(id) > 64:
            raise InvalidPolicy("Cycle id must be a non-empty string of at most 64 characters")
        self.id = id

    def key(self, now: datetime) -> str:
        return f"cycle:{_escape(self.id)}"

    def __repr__(self) -> str:
        return f"Cycle({self.id!r})"


class Bucket(Window):
    """Fixed buckets of N seconds aligned to the Unix epoch."""

    def __init__(self, seconds: int) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
            raise InvalidPolicy("Bucket seconds must be a positive integer")
        self.seconds = seconds

    def key(self, now: datetime) -> str:
        return f"bucket{self.seconds}:{int(now.timestamp()) // self.seconds}"

    def __repr__(self) -> str:
        return f"Bucket({self.seconds})"


class Ever(Window):
    """One window for all time: the scope is executed at most once, ever."""

    def key(self, now: datetime) -> str:
        return "ever"

    def __repr__(self) -> str:
        return "Ever()"


# --------------------------------------------------------------------------------- policies


def _check_by(by: Sequence[str]) -> tuple[str, ...]:
    if isinstance(by, str):
        by = (by,)
    fields = tuple(by)
    if not fields:
        raise InvalidPolicy("by= needs at least one intent field")
    for name in fields:
        if name not in INTENT_FIELDS and not (name.startswith("tags.") and len(name) > 5):
            known = ", ".join(sorted(INTENT_FIELDS))
            raise InvalidPolicy(f"by= names {name!r}, which is not an intent field ({known}, tags.NAME)")
    if len(set(fields)) != len(fields):
        raise InvalidPolicy("by= names a field twice")
    return fields


_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*")


def _escape(value: str) -> str:
    return value if _PLAIN.fullmatch(value) else quote(value, safe="")


def scope_key(kind: ScopeKind, by: tuple[str, ...], intent: OrderIntent, window: str = "") -> str:
    """Readable, unambiguous key: ``once|strategy=spx-calendar|@XNYS:2026-11-20``."""
    parts = [kind.value] + [f"{name}={_escape(intent.field_value(name))}" for name in by]
    if window:
        parts.append("@" + window)
    return "|".join(parts)


class Policy(ABC):
    """Base of every policy. ``by`` names the intent fields that make up the scope."""

    by: tuple[str, ...]

    @abstractmethod
    def rule(self, intent: OrderIntent, now: datetime) -> ScopeRule:
        """The scope this policy asks the store to take for ``intent`` at ``now``."""


class OncePer(Policy):
    """At most one executed intent per scope per window.

    A rejected, abandoned or not-found intent (nothing executed) frees the window again.
    """

    def __init__(self, window: Window, *, by: Sequence[str] = DEFAULT_BY) -> None:
        if not isinstance(window, Window):
            raise InvalidPolicy(f"OncePer needs a Window (TradingDay, CalendarDay, ...), got {window!r}")
        self.window = window
        self.by = _check_by(by)

    def rule(self, intent: OrderIntent, now: datetime) -> ScopeRule:
        key = scope_key(ScopeKind.ONCE, self.by, intent, self.window.key(now))
        base = "" if isinstance(self.window, Ever) else key[: key.rindex("|@") + 2]
        return ScopeRule(ScopeKind.ONCE, key, repr(self), base=base)

    def __repr__(self) -> str:
        return f"OncePer({self.window!r}, by={self.by})"


class Cooldown(Policy):
    """No new intent within ``seconds`` of the last one for the scope.

    An intent whose outcome is not known yet (in flight or UNKNOWN) blocks past the cooldown.
    """

    def __init__(self, seconds: float, *, by: Sequence[str] = DEFAULT_BY) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < 10**9:
            raise InvalidPolicy("Cooldown seconds must be a positive number")
        self.seconds = float(seconds)
        self.by = _check_by(by)

    def rule(self, intent: OrderIntent, now: datetime) -> ScopeRule:
        key = scope_key(ScopeKind.COOLDOWN, self.by, intent)
        return ScopeRule(ScopeKind.COOLDOWN, key, repr(self), seconds=self.seconds)

    def __repr__(self) -> str:
        return f"Cooldown({self.seconds:g}, by={self.by})"


class MaxOpen(Policy):
    """At most ``n`` open intents per scope.

    Open means in flight, UNKNOWN, working at the venue, or filled and not yet marked closed
    with :meth:`Guard.mark_closed`.
    """

    def __init__(self, n: int, *, by: Sequence[str] = DEFAULT_BY) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidPolicy("MaxOpen n must be a positive integer")
        self.n = n
        self.by = _check_by(by)

    def rule(self, intent: OrderIntent, now: datetime) -> ScopeRule:
        key = scope_key(ScopeKind.OPEN, self.by, intent)
        return ScopeRule(ScopeKind.OPEN, key, repr(self), limit=self.n)

    def __repr__(self) -> str:
        return f"MaxOpen({self.n}, by={self.by})"


class OneOpen(MaxOpen):
    """At most one open intent per scope: ``MaxOpen(1)``."""

    def __init__(self, *, by: Sequence[str] = DEFAULT_BY) -> None:
        super().__init__(1, by=by)

    def __repr__(self) -> str:
        return f"OneOpen(by={self.by})"


PolicyArg = Policy | Sequence[Policy]


def as_policies(policy: PolicyArg | None) -> tuple[Policy, ...]:
    """Normalise ``policy=`` (one policy or several) to a non-empty tuple."""
    if policy is None:
        raise InvalidPolicy(
            "no policy given: pass policy=OncePer(...)/Cooldown(...)/OneOpen(...) to the call "
            "or a default to Guard.open(..., policy=...)"
        )
    policies = (policy,) if isinstance(policy, Policy) else tuple(policy)
    if not policies or not all(isinstance(p, Policy) for p in policies):
        raise InvalidPolicy(f"policy must be a Policy or a list of them, got {policy!r}")
    seen: dict[tuple[str, tuple[str, ...], str], Policy] = {}
    for p in policies if len(policies) > 1 else ():
        # Two policies that map every intent to the same scope would fight over one row.
        window = repr(p.window) if isinstance(p, OncePer) else ""
        kind = ScopeKind.ONCE if isinstance(p, OncePer) else ScopeKind.COOLDOWN if isinstance(p, Cooldown) else ScopeKind.OPEN
        shape = (kind.value, p.by, window)
        if shape in seen:
            raise InvalidPolicy(f"{seen[shape]!r} and {p!r} guard the same scope; keep one of them")
        seen[shape] = p
    return policies


def utc_from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)
