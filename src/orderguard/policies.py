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
from decimal import Context, Decimal, InvalidOperation, localcontext
from enum import StrEnum
from typing import Any
from urllib.parse import quote, unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ClockError, InvalidIntent, InvalidPolicy
from .intent import INTENT_FIELDS, OrderIntent, is_text

DEFAULT_BY: tuple[str, ...] = ("account", "strategy", "symbol", "side")


class ScopeKind(StrEnum):
    """How the store arbitrates a scope."""

    ONCE = "once"  # one executed intent per key (the key carries the window)
    COOLDOWN = "cooldown"  # one intent per key per N seconds
    OPEN = "open"  # at most N open intents per key
    RATE = "rate"  # at most N intents per key per rolling period (a circuit breaker)
    NOTIONAL = "notional"  # at most this much notional per key per rolling period


@dataclass(frozen=True)
class ScopeRule:
    """A policy applied to one intent at one instant: what the store must arbitrate."""

    kind: ScopeKind
    key: str
    policy: str  # the policy as written, for messages
    limit: int = 1  # OPEN: how many may be open at once
    seconds: float = 0.0  # COOLDOWN: the quiet period
    base: str = ""  # ONCE with a rolling window: the key up to its window ("once|...|@")
    amount: Decimal | None = None  # NOTIONAL: the most notional per period
    notional: Decimal | None = None  # NOTIONAL: this intent's notional
    trip: bool = False  # RATE/NOTIONAL: a refusal halts ``halt_scope`` until an operator resumes it
    halt_scope: str = ""  # RATE/NOTIONAL: the trading scope a trip halts ("strategy=x")

    @property
    def is_limit(self) -> bool:
        return self.kind in (ScopeKind.RATE, ScopeKind.NOTIONAL)


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


def _check_by(by: Sequence[str], what: str = "by=") -> tuple[str, ...]:
    if isinstance(by, str):
        by = (by,)
    fields = tuple(by)
    if not fields:
        raise InvalidPolicy("by= needs at least one intent field")
    for name in fields:
        if name not in INTENT_FIELDS and not (name.startswith("tags.") and len(name) > 5):
            known = ", ".join(sorted(INTENT_FIELDS))
            raise InvalidPolicy(f"{what} names {name!r}, which is not an intent field ({known}, tags.NAME)")
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


class RateLimit(Policy):
    """Circuit breaker: at most ``n`` intents per scope in any ``per_seconds``.

    Counted atomically with the claim; every intent that reached (or may have reached) the venue
    counts: in flight, UNKNOWN, filled, rejected, canceled. Only ABANDONED and NOT_FOUND intents
    (nothing left) give their slot back. With
    ``trip=True`` the first refusal also halts the scope (``HALTED``) until an operator runs
    ``orderguard resume``.
    """

    def __init__(self, n: int, per_seconds: float, *, by: Sequence[str] = ("strategy",), trip: bool = False) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidPolicy("RateLimit n must be a positive integer")
        self.n = n
        self.per_seconds = _period(per_seconds, "RateLimit")
        self.by = _check_by(by)
        self.trip = bool(trip)

    def rule(self, intent: OrderIntent, now: datetime) -> ScopeRule:
        key = scope_key(ScopeKind.RATE, self.by, intent, f"{self.per_seconds:g}s")
        return ScopeRule(
            ScopeKind.RATE, key, repr(self), limit=self.n, seconds=self.per_seconds,
            trip=self.trip, halt_scope=halt_scope_of(self.by, intent, self if self.trip else None),
        )

    def __repr__(self) -> str:
        return f"RateLimit({self.n}, per_seconds={self.per_seconds:g}, by={self.by}{', trip=True' if self.trip else ''})"


class NotionalLimit(Policy):
    """Circuit breaker: at most ``amount`` of notional (quantity × price) per scope in any
    ``per_seconds``, counted like :class:`RateLimit`.

    The price is the limit price, else the stop price, else the intent's ``reference_price``;
    a market order without a reference price is refused (InvalidIntent), never guessed.
    """

    def __init__(
        self, amount: Decimal | int | str, per_seconds: float, *, by: Sequence[str] = ("strategy",), trip: bool = False
    ) -> None:
        if isinstance(amount, (bool, float)):
            raise InvalidPolicy("NotionalLimit amount must be a Decimal, int or str (floats are inexact)")
        try:
            value = Decimal(amount)
        except (InvalidOperation, TypeError, ValueError):
            raise InvalidPolicy(f"NotionalLimit amount {amount!r} is not a number") from None
        if not value.is_finite() or value <= 0:
            raise InvalidPolicy("NotionalLimit amount must be a positive, finite number")
        self.amount = value
        self.per_seconds = _period(per_seconds, "NotionalLimit")
        self.by = _check_by(by)
        self.trip = bool(trip)

    def rule(self, intent: OrderIntent, now: datetime) -> ScopeRule:
        price = intent.price_for_notional()
        if price is None:
            raise InvalidIntent(
                "reference_price",
                f"{self!r} needs a price for a {intent.order_type.value} order: set reference_price "
                "(the last price seen); nothing was sent",
            )
        key = scope_key(ScopeKind.NOTIONAL, self.by, intent, f"{self.per_seconds:g}s")
        return ScopeRule(
            ScopeKind.NOTIONAL, key, repr(self), seconds=self.per_seconds, amount=self.amount,
            notional=_exact_product(intent.quantity, price), trip=self.trip,
            halt_scope=halt_scope_of(self.by, intent, self if self.trip else None),
        )

    def __repr__(self) -> str:
        return (
            f"NotionalLimit({format(self.amount, 'f')}, per_seconds={self.per_seconds:g}, by={self.by}"
            f"{', trip=True' if self.trip else ''})"
        )


def _exact_product(quantity: Decimal, price: Decimal) -> Decimal:
    with localcontext(Context(prec=80)):  # never rounded: the default 28 digits could be
        return quantity * price


def _period(seconds: float, what: str) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 366 * 86400:
        raise InvalidPolicy(f"{what} per_seconds must be a positive number of seconds (at most a year)")
    return float(seconds)


# ---------------------------------------------------------------------------- halt scopes

GLOBAL_SCOPE = "global"


def halt_scope_of(by: Sequence[str], intent: OrderIntent, policy: object = None) -> str:
    """The trading scope of ``intent`` over the fields ``by``: ``strategy=x,symbol=SPX``.

    With ``policy`` (a tripping limit), an empty field is refused: a halt must name what it stops.
    """
    if policy is not None:
        for name in by:
            if not intent.field_value(name):
                raise InvalidIntent(
                    name, f"{policy!r} trips a halt of its by= scope, and this intent has no {name}; nothing was sent"
                )
    return ",".join(f"{name}={_escape(intent.field_value(name))}" for name in sorted(by))


def scope_text(**fields: str) -> str:
    """A trading scope from field values: ``scope_text(account="main", symbol="SPX")``."""
    return ",".join(f"{name}={_escape(value)}" for name, value in sorted(fields.items())) or GLOBAL_SCOPE


def parse_halt_scope(text: str) -> tuple[tuple[str, str], ...]:
    """``global`` -> (); ``strategy=x,symbol=SPX`` -> (("strategy", "x"), ("symbol", "SPX")).

    Raises InvalidPolicy for anything else (unknown fields, empty values, a field twice).
    """
    text = text.strip()
    if not is_text(text):
        raise InvalidPolicy("a trading scope must be valid Unicode text (it holds a lone surrogate)")
    if text.lower() in (GLOBAL_SCOPE, "*"):
        return ()
    if not text or len(text) > 512:
        raise InvalidPolicy("a trading scope is 'global' or field=value pairs joined by ',' (e.g. strategy=spx,symbol=SPX)")
    pairs: dict[str, str] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not value:
            raise InvalidPolicy(f"{part.strip()!r} in trading scope {text!r} is not field=value")
        _check_by((name.strip(),), "the trading scope")
        name = name.strip()
        if name in pairs:
            raise InvalidPolicy(f"trading scope {text!r} names {name!r} twice")
        pairs[name] = _scope_value(name, unquote(value.strip()))
    return tuple(sorted(pairs.items()))


def _scope_value(name: str, value: str) -> str:
    """Spell a value as intents do, so ``side=buy`` matches BUY orders (a halt must never
    silently match nothing); enum fields must name one of their values."""
    from .intent import OrderType, Side, TimeInForce

    enums: dict[str, type[StrEnum]] = {"side": Side, "order_type": OrderType, "time_in_force": TimeInForce}
    if name in enums:
        allowed = [member.value for member in enums[name]]
        if value.upper() not in allowed:
            raise InvalidPolicy(f"{name}={value!r} can never match: {name} is one of {', '.join(allowed)}")
        return value.upper()
    return value


def canonical_halt_scope(text: str) -> str:
    """One spelling per trading scope (fields sorted, values escaped as in scope keys)."""
    pairs = parse_halt_scope(text)
    return ",".join(f"{k}={_escape(v)}" for k, v in pairs) if pairs else GLOBAL_SCOPE


def halt_scope_matches(scope: str, intent: OrderIntent) -> bool:
    """Whether a halt of trading scope ``scope`` covers ``intent``."""
    return all(intent.field_value(name) == value for name, value in parse_halt_scope(scope))


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
        if isinstance(p, (RateLimit, NotionalLimit)):
            window = f"{p.per_seconds:g}s"
        kind = _KINDS.get(type(p), ScopeKind.OPEN)
        shape = (kind.value, p.by, window)
        if shape in seen:
            raise InvalidPolicy(f"{seen[shape]!r} and {p!r} guard the same scope; keep one of them")
        seen[shape] = p
    return policies


_KINDS: dict[type, ScopeKind] = {
    OncePer: ScopeKind.ONCE, Cooldown: ScopeKind.COOLDOWN, RateLimit: ScopeKind.RATE, NotionalLimit: ScopeKind.NOTIONAL,
}


def utc_from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)
