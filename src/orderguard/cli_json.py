"""``--json`` output of the CLI: records as plain JSON (Decimal as strings, times ISO 8601 UTC)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from .intent import canonical_decimal

# Float fields of the records that hold Unix times (store clock).
TIME_FIELDS = frozenset({
    "at", "created_at", "updated_at", "first_miss_at", "send_by_at", "registered_at", "heartbeat_at", "stopped_at",
    "expires_at", "acquired_at",
})


def iso_time(epoch: float) -> str:
    """``2026-11-21T08:20:51.744123Z``."""
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def plain(value: Any) -> Any:
    """A JSON-ready copy of a record, list or value."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            is_time = f.name in TIME_FIELDS and isinstance(item, float)
            out[f.name] = iso_time(item) if is_time else plain(item)
        return out
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Decimal):
        return canonical_decimal(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    return value


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(plain(document), indent=2, ensure_ascii=False)
