"""Broker specs: a URL-like string naming a venue, for the CLI and other tools.

``open_broker("paper:///abs/path/paper.db")`` opens the embedded paper venue. Each scheme has
one opener, registered here; a later adapter adds its own line::

    register("alpaca", _open_alpaca, example="alpaca://paper")

An opener never creates a venue: reconciling against an empty venue made up by a typo would
read every order as "not found" and free scopes whose orders may well exist.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

from ..errors import ConfigurationError, StoreError

if TYPE_CHECKING:
    from collections.abc import Callable

    from .base import Broker


class BrokerSpecError(ConfigurationError):
    """A broker spec that names no usable venue (unknown scheme, bad path, not a venue)."""


@dataclass(frozen=True)
class _Scheme:
    opener: Callable[[str], Broker]  # receives the whole spec
    example: str


_SCHEMES: dict[str, _Scheme] = {}


def register(scheme: str, opener: Callable[[str], Broker], *, example: str) -> None:
    """Make ``scheme://...`` specs open with ``opener(spec)``; ``example`` is shown in errors."""
    _SCHEMES[scheme.lower()] = _Scheme(opener, example)


def known_specs() -> list[str]:
    """One example spec per registered scheme."""
    return [s.example for _, s in sorted(_SCHEMES.items())]


def open_broker(spec: str) -> Broker:
    """The venue a spec names. Raises BrokerSpecError (a ConfigurationError) with what to fix."""
    scheme, sep, _ = spec.partition("://")
    known = ", ".join(known_specs())
    if not sep or not scheme:
        raise BrokerSpecError(f"broker spec {spec!r} has no scheme; use one of: {known}")
    entry = _SCHEMES.get(scheme.lower())
    if entry is None:
        raise BrokerSpecError(f"unknown broker scheme {scheme + '://'!r} in {spec!r}; known: {known}")
    return entry.opener(spec)


def close_broker(broker: Broker) -> None:
    """Release a broker's resources when it has any (``close()`` is not part of the protocol)."""
    close: Callable[[], object] | None = getattr(broker, "close", None)
    if close is not None:
        close()


# ------------------------------------------------------------------------------- paper://

PAPER_EXAMPLE = "paper:///abs/path/paper.db"


def _open_paper(spec: str) -> Broker:
    """``paper:///abs/path.db`` (three slashes: an absolute path) -> an existing PaperBroker venue."""
    from .paper import PaperBroker

    path = spec.partition("://")[2]
    if not path.startswith("/"):
        raise BrokerSpecError(
            f"broker spec {spec!r} needs an absolute path after paper:// (three slashes), "
            f"like {PAPER_EXAMPLE}"
        )
    path = os.path.normpath(path)
    if not os.path.isfile(path):
        raise BrokerSpecError(
            f"no paper venue at {path} (from {spec!r}); nothing was created. Check the path: it must be "
            "the venue file your bots trade on"
        )
    tables = _sqlite_tables(path, spec)
    if "orders" not in tables:
        raise BrokerSpecError(
            f"{path} (from {spec!r}) is an SQLite file but not a paper venue (no orders table); "
            "is it the ledger? Pass the venue's file"
        )
    try:
        return PaperBroker(path)
    except StoreError as exc:  # locked or damaged venue file: not a ledger problem
        raise BrokerSpecError(f"cannot open the paper venue {path} (from {spec!r}): {exc}") from exc


def _sqlite_tables(path: str, spec: str) -> set[str]:
    """Table names of an existing SQLite file. Writes nothing: no journal-mode change, and
    ``mode=rw`` does not create a missing file."""
    try:
        conn = sqlite3.connect(f"file:{quote(path)}?mode=rw", uri=True, timeout=5.0)
        try:
            return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise BrokerSpecError(f"{path} (from {spec!r}) is not an SQLite file, so not a paper venue") from exc
        raise BrokerSpecError(f"cannot read the paper venue {path} (from {spec!r}): {exc}") from exc


register("paper", _open_paper, example=PAPER_EXAMPLE)


# ------------------------------------------------------------------- real venues

_COMMON = {"account", "timeout", "url", "lookup_grace"}
_SHOWN = {"account", "timeout", "lookup_grace", "sandbox", "symbols", "lookup_before_send"}  # never credentials
_YES, _NO = ("1", "true", "yes"), ("0", "false", "no")


def _shown(spec: str) -> str:
    """The spec as errors may show it: options other than the harmless ones are masked (a key
    pasted into a spec by mistake must not reach a terminal or a log)."""
    head, _, query = spec.partition("?")
    if not query:
        return head
    shown = []
    for part in query.split("&"):
        key, sep, value = part.partition("=")
        shown.append(f"{key}{sep}{value if key in _SHOWN else '***' if sep else ''}")
    return f"{head}?{'&'.join(shown)}"


def _venue_options(spec: str, query: str, allowed: set[str]) -> dict[str, str]:
    """A spec's ``?key=value&...`` options: known keys, each once."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise BrokerSpecError(f"broker spec {_shown(spec)!r} has a malformed option list; use ?key=value&key=value") from None
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            raise BrokerSpecError(f"broker spec {_shown(spec)!r}: unknown option {key!r}; known: {', '.join(sorted(allowed))}")
        if key in options:
            raise BrokerSpecError(f"broker spec {_shown(spec)!r}: option {key!r} is given twice")
        options[key] = value
    return options


def _seconds(spec: str, options: dict[str, str], key: str) -> dict[str, float]:
    if key not in options:
        return {}  # the adapter's own default
    try:
        return {key: float(options[key])}
    except ValueError:
        raise BrokerSpecError(f"broker spec {_shown(spec)!r}: {key}={options[key]!r} is not a number of seconds") from None


def _flag(spec: str, options: dict[str, str], key: str) -> bool:
    value = options.get(key, "0").lower()
    if value not in _YES + _NO:
        raise BrokerSpecError(f"broker spec {_shown(spec)!r}: {key}={options[key]!r}; use {key}=1 or {key}=0")
    return value in _YES


def _common(spec: str, options: dict[str, str]) -> dict[str, Any]:
    return {
        "account": options.get("account", "main"),
        "url": options.get("url") or None,
        **_seconds(spec, options, "timeout"),
        **_seconds(spec, options, "lookup_grace"),
    }


def _open_alpaca(spec: str) -> Broker:
    """``alpaca://paper`` or ``alpaca://live`` [``?account=&timeout=&url=&lookup_grace=``]."""
    where, _, query = spec.partition("://")[2].partition("?")
    if where.rstrip("/") not in ("paper", "live"):
        raise BrokerSpecError(f"broker spec {_shown(spec)!r}: say alpaca://paper or alpaca://live")
    options = _venue_options(spec, query, _COMMON)
    try:
        from .alpaca import AlpacaBroker

        return AlpacaBroker.from_env(paper=where.rstrip("/") == "paper", **_common(spec, options))
    except ConfigurationError as exc:
        raise BrokerSpecError(f"cannot open {_shown(spec)!r}: {exc}") from exc


def _open_ccxt(spec: str) -> Broker:
    """``ccxt://binance`` [``?sandbox=1&account=&timeout=&url=&lookup_grace=&symbols=BTC/USDT,ETH/USDT&lookup_before_send=1``]."""
    exchange, _, query = spec.partition("://")[2].partition("?")
    options = _venue_options(spec, query, _COMMON | {"sandbox", "symbols", "lookup_before_send"})
    symbols = [s.strip() for s in options.get("symbols", "").split(",") if s.strip()]
    try:
        from .ccxt import CcxtBroker

        return CcxtBroker.from_env(
            exchange.rstrip("/").lower(), sandbox=_flag(spec, options, "sandbox"), symbols=symbols,
            lookup_before_send=_flag(spec, options, "lookup_before_send"), **_common(spec, options),
        )
    except ConfigurationError as exc:
        raise BrokerSpecError(f"cannot open {_shown(spec)!r}: {exc}") from exc


register("alpaca", _open_alpaca, example="alpaca://paper")
register("ccxt", _open_ccxt, example="ccxt://binance?sandbox=1")
