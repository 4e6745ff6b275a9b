"""What the real-venue adapters share: keys from the environment, base URLs, exact numbers."""

from __future__ import annotations

import ipaddress
import math
import os
import threading
from collections import OrderedDict
from decimal import Decimal, InvalidOperation
from urllib.parse import urlsplit

from ..errors import ConfigurationError

_LOOPBACK_NAMES = {"localhost"}


def key_from_env(variable: str, venue: str) -> str:
    """A credential from the environment; a missing or empty one is a ConfigurationError that
    names the variable (never the value)."""
    value = os.environ.get(variable, "").strip()
    if not value:
        raise ConfigurationError(f"{venue}: the environment variable {variable} is not set (or empty); export it before starting")
    return value


def check_credential(value: object, what: str, venue: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{venue}: {what} must be a non-empty string")
    return value.strip()


def base_url(url: str, venue: str) -> str:
    """A venue base URL override, without a trailing slash. Plain http only to this machine:
    elsewhere the API keys would cross the network in clear text. Errors show the URL without
    any user or password in it."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ConfigurationError(f"{venue}: the url must not carry a user or password (keys come from the environment)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"{venue}: url {url!r} must look like https://host[:port]")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{venue}: the url must be a plain base URL like https://host[:port] (no query or fragment)")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"{venue}: url {url!r} has an invalid port") from exc
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigurationError(
            f"{venue}: url {url!r} uses plain http to another host; the API keys would travel in clear text. Use https"
        )
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def positive_seconds(value: float, what: str) -> float:
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"{what} must be a positive number of seconds, got {value!r}")
    return seconds


def grace_seconds(value: float) -> float:
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(f"lookup_grace must be >= 0 seconds, got {value!r}")
    return seconds


def venue_decimal(value: object, what: str) -> Decimal:
    """A number from a venue's JSON (string, int or float) as an exact Decimal. Floats go
    through ``repr`` (their shortest exact spelling), never through binary expansion."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a number, got {value!r}")
    if isinstance(value, float):
        value = repr(value)
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{what}: expected a number, got {value!r}") from None
    if not number.is_finite():
        raise ValueError(f"{what}: expected a finite number, got {value!r}")
    return number


def optional_decimal(value: object, what: str) -> Decimal | None:
    if value is None or value == "":
        return None
    return venue_decimal(value, what)


def clip(text: str, limit: int = 300) -> str:
    """A venue's error text, short enough for one log line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class RecentIds:
    """Client order ids this process sent, with when, for the resend rules (thread-safe; the
    oldest are forgotten past ``limit``)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._when: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, coid: str, when: float) -> None:
        with self._lock:
            self._when[coid] = when
            self._when.move_to_end(coid)
            while len(self._when) > self._limit:
                self._when.popitem(last=False)

    def get(self, coid: str) -> float | None:
        with self._lock:
            return self._when.get(coid)

    def discard(self, coid: str) -> None:
        with self._lock:
            self._when.pop(coid, None)

    def after_fork(self) -> None:
        self._lock = threading.Lock()


class Hidden:
    """A credential that shows as ``***`` in reprs, ``vars()`` and tracebacks' locals."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "'***'"
