"""Alerts: tell an operator within seconds, without ever slowing or failing an order.

A :class:`Notifier` takes alerts from the order path (``notify`` only puts them on a bounded
queue) and delivers them from its own thread to its sinks: :class:`LogSink`,
:class:`WebhookSink` (JSON POST) and :class:`AppriseSink` (SMS, Telegram, Slack, email, ... via
``orderguard[alerts]``). A storm is aggregated: the first alert of a kind for a scope goes out
at once, the rest of the interval is counted and sent as one summary when it ends.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import urllib.request
import weakref
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

log = logging.getLogger("orderguard.alerts")


class AlertKind(StrEnum):
    BLOCKED = "BLOCKED"  # a duplicate (or other policy refusal) was prevented
    HALTED = "HALTED"  # a trading scope was halted, or a claim hit a halt
    UNKNOWN = "UNKNOWN"  # an order's outcome is unknown until reconciled
    DRIFT = "DRIFT"  # the venue's positions differ from the ledger's
    STALE_RUNNER = "STALE_RUNNER"  # a runner stopped heartbeating without stopping
    MIXED_VERSIONS = "MIXED_VERSIONS"  # live runners of one strategy run different code
    LEADER = "LEADER"  # an exclusive strategy's leader lease changed hands


_SEVERITY = {
    AlertKind.BLOCKED: "warning", AlertKind.HALTED: "critical", AlertKind.UNKNOWN: "critical",
    AlertKind.DRIFT: "critical", AlertKind.STALE_RUNNER: "warning", AlertKind.MIXED_VERSIONS: "critical",
    AlertKind.LEADER: "info",
}
_EMOJI = {"critical": "\N{OCTAGONAL SIGN}", "warning": "\N{WARNING SIGN}", "info": "\N{INFORMATION SOURCE}"}


@dataclass(frozen=True)
class Alert:
    """One alert, or a summary of several of one kind for one scope (``count`` > 1)."""

    kind: AlertKind
    scope: str  # what it is about: "strategy=spx,symbol=SPX", a runner, an intent
    message: str  # the operator log line of the (last) event
    at: float = field(default_factory=time.time)
    count: int = 1
    first_at: float | None = None
    details: dict[str, str] = field(default_factory=dict)

    @property
    def severity(self) -> str:
        return _SEVERITY[self.kind]

    @property
    def title(self) -> str:
        more = f" ×{self.count}" if self.count > 1 else ""
        return f"{_EMOJI[self.severity]} orderguard {self.kind.value}{more}: {self.scope}"

    @property
    def body(self) -> str:
        if self.count > 1 and self.first_at is not None:
            span = self.at - self.first_at
            return f"{self.count} {self.kind.value} events for {self.scope} in {span:.0f}s; the last: {self.message}"
        return self.message

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document.update(kind=self.kind.value, severity=self.severity, title=self.title, body=self.body)
        return document


class Sink(Protocol):
    """Where alerts go. ``send`` may block or raise: the notifier's thread absorbs both."""

    name: str

    def send(self, alert: Alert) -> None: ...


class LogSink:
    """Alerts as log records on the ``orderguard.alerts`` logger (ERROR for critical ones)."""

    name = "log"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log

    def send(self, alert: Alert) -> None:
        level = logging.ERROR if alert.severity == "critical" else logging.WARNING
        self._log.log(level, "%s — %s", alert.title, alert.body, extra={"alert": alert.kind.value})


class WebhookSink:
    """POSTs each alert as JSON (``Alert.to_json()``) to ``url``; a non-2xx answer is a failure."""

    def __init__(self, url: str, *, timeout: float = 5.0, headers: dict[str, str] | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"webhook URL {url!r} must start with http:// or https://")
        self.url = url
        self.name = f"webhook {url.split('?', maxsplit=1)[0]}"  # never the query string: it may hold a token
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "User-Agent": "orderguard", **(headers or {})}

    def send(self, alert: Alert) -> None:
        body = json.dumps(alert.to_json()).encode()
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            if not 200 <= response.status < 300:
                raise OSError(f"{self.name} answered HTTP {response.status}")


class AppriseSink:
    """Apprise URLs (``tgram://``, ``slack://``, ``mailto://``, SMS gateways, ...): ``orderguard[alerts]``."""

    name = "apprise"

    def __init__(self, urls: Sequence[str]) -> None:
        try:
            import apprise
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigurationError("Apprise alert URLs need: pip install 'orderguard[alerts]'") from None
        self._apprise = apprise.Apprise()
        for url in urls:
            if not self._apprise.add(url):
                scheme = url.split("://", 1)[0]
                raise ConfigurationError(f"Apprise does not understand the alert URL scheme {scheme!r}://")

    def send(self, alert: Alert) -> None:
        import apprise

        kind = {"critical": apprise.NotifyType.FAILURE, "warning": apprise.NotifyType.WARNING}.get(
            alert.severity, apprise.NotifyType.INFO
        )
        if not self._apprise.notify(title=alert.title, body=alert.body, notify_type=kind):
            raise OSError("Apprise could not deliver the alert to any of its URLs")


def sink_from_url(url: str) -> Sink:
    """``log://`` → LogSink; ``http(s)://`` → WebhookSink; anything else → an Apprise URL."""
    if url in ("log", "log://"):
        return LogSink()
    if url.startswith(("http://", "https://")):
        return WebhookSink(url)
    return AppriseSink([url])


_NOTIFIERS: weakref.WeakSet[Notifier] = weakref.WeakSet()


def _restart_in_child() -> None:
    for notifier in list(_NOTIFIERS):
        notifier._after_fork()


os.register_at_fork(after_in_child=_restart_in_child)


@dataclass
class _Window:
    until: float
    count: int = 0
    last: Alert | None = None
    first_at: float = 0.0


class Notifier:
    """Aggregates alerts per (kind, scope) and delivers them from a background thread.

    ``interval``: after an alert goes out, further ones of its kind and scope wait for the end of
    the interval and go out as one summary with their count. ``notify`` never blocks and never
    raises; when the queue is full the alert is dropped and counted in ``dropped``.
    """

    def __init__(self, sinks: Iterable[Sink | str] = (), *, interval: float = 60.0, queue_size: int = 1000) -> None:
        self.sinks: list[Sink] = [sink_from_url(s) if isinstance(s, str) else s for s in sinks] or [LogSink()]
        self.interval = float(interval)
        self.sent = 0
        self.failures = 0
        self.dropped = 0
        self._queue_size = queue_size
        self._closed = False
        self._start()
        _NOTIFIERS.add(self)

    def _start(self) -> None:
        """(Re)build the locks, queue and threads: at creation, and in a forked child, which
        inherits none of the parent's threads and may inherit a lock mid-use."""
        self._queue: queue.Queue[Alert | None] = queue.Queue(maxsize=self._queue_size)
        self._windows: dict[tuple[AlertKind, str], _Window] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._busy = 0
        self._sender = threading.Thread(target=self._send_loop, name="orderguard-alerts", daemon=True)
        self._ticker = threading.Thread(target=self._tick_loop, name="orderguard-alert-windows", daemon=True)
        self._sender.start()
        self._ticker.start()

    def _after_fork(self) -> None:
        if not self._closed:
            self._start()

    def notify(self, kind: AlertKind, scope: str, message: str, **details: str) -> None:
        """Queue an alert (aggregated with others of its kind and scope). Never blocks or raises."""
        try:
            now = time.time()
            alert = Alert(AlertKind(kind), scope, message, at=now, details=dict(details))
            with self._lock:
                if self._closed:
                    return
                window = self._windows.get((alert.kind, scope))
                if window is not None and now < window.until:
                    window.count += 1
                    window.last = alert
                    return
                if window is not None and window.count and window.last is not None:
                    # the window ended before the timer saw it: its summary goes first
                    self._put(replace(window.last, count=window.count, first_at=window.first_at))
                self._windows[(alert.kind, scope)] = _Window(until=now + self.interval, first_at=now)
            self._put(alert)
            self._wake.set()
        except Exception:  # an alert must never fail an order path
            log.exception("alert not queued")

    def _put(self, alert: Alert | None) -> None:
        with self._idle:
            self._busy += 1  # before the put: the sender may finish it first
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            with self._idle:
                self.dropped += 1
            self._done()

    def _tick_loop(self) -> None:
        while True:
            with self._lock:
                closed = self._closed
                now = time.time()
                due = [(key, w) for key, w in self._windows.items() if now >= w.until]
                for key, window in due:
                    if window.count and window.last is not None:
                        summary = replace(window.last, count=window.count, first_at=window.first_at)
                        self._windows[key] = _Window(until=now + self.interval, first_at=now)
                        self._put(summary)
                    else:
                        del self._windows[key]
                soonest = min((w.until for w in self._windows.values()), default=now + self.interval)
            if closed:
                return
            self._wake.wait(timeout=max(0.01, min(soonest - time.time(), 1.0)))
            self._wake.clear()

    def _send_loop(self) -> None:
        while True:
            try:
                alert = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if alert is None:
                self._done()
                return
            for sink in self.sinks:
                try:
                    sink.send(alert)
                    self.sent += 1
                except Exception as exc:  # a failing sink is logged, never raised
                    self.failures += 1
                    log.warning("alert sink %s failed: %s: %s", getattr(sink, "name", sink), type(exc).__name__, exc)
            self._done()

    def _done(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Send pending summaries now and wait until the queue is delivered. True if it was."""
        with self._lock:
            now = time.time()
            for key, window in list(self._windows.items()):
                if window.count and window.last is not None:
                    self._put(replace(window.last, count=window.count, first_at=window.first_at))
                    self._windows[key] = _Window(until=now + self.interval, first_at=now)
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is pending (summaries included), then stop the threads."""
        if self._closed:
            return
        self.flush(timeout)
        with self._lock:
            self._closed = True
        self._wake.set()
        with self._idle:
            self._busy += 1
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:  # a stuck sink: the sender stops once it frees up (it sees _closed)
            self._done()
        self._sender.join(timeout)
        self._ticker.join(timeout)
