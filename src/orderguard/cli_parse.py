"""Parsing of CLI option values that typer cannot check by itself."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import typer

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
SINCE_HELP = (
    "Only since this time: ISO 8601 (2026-11-21T14:30:00Z; no zone means UTC) or a duration ago "
    "(90s, 15m, 2h, 1d, 1w)."
)


def parse_since(text: str, now: float, option: str = "--since") -> float:
    """Unix time of ``text``: an ISO 8601 timestamp, or ``15m`` / ``2h`` / ``1d`` before ``now``."""
    match = _RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2).lower()]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither an ISO 8601 time (2026-11-21T14:30:00Z) nor a duration ago (15m, 2h, 1d)",
            param_hint=option,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
