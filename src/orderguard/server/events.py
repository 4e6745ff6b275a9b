"""Live events for ``GET /v1/events``: every intent state change and blocked attempt, from every
process using the ledger, fanned out to server-sent-event subscribers.

PostgreSQL pushes them (LISTEN/NOTIFY, from every host), each notification naming the intent or
attempt that changed. SQLite is polled every ``interval``: attempts by id and intents of the
last day changed since the last poll (both primary-key ranges). Nothing is polled while nobody
is subscribed, and a new subscriber starts from now.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ..cli_json import plain
from ..errors import OrderGuardError
from ..store.base import id_floor

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ..store.base import IntentRecord, Store

log = logging.getLogger("orderguard.server")
RECENT = 86_400.0  # seconds: intents created this recently are scanned for changes (SQLite)
LISTEN_SPAN = 2.0  # seconds one LISTEN connection waits before it is renewed


class EventHub:
    """Publishes ``{"type": "intent" | "blocked" | "halts", ...}`` dictionaries to subscribers."""

    def __init__(self, store: Store, *, interval: float = 0.25) -> None:
        self.store = store
        self.interval = interval
        self._subscribers: set[Callable[[dict[str, Any]], None]] = set()
        self._lock = threading.Lock()  # the subscriber set
        self._poll_lock = threading.Lock()  # one poll (or baseline) at a time
        self._stop = threading.Event()
        self._last_attempt = 0
        self._states: dict[str, tuple[str, int]] = {}
        self._halts: list[Any] = []
        self._since = 0.0  # store clock of the last poll (intents changed since are looked at)
        self._idle = True
        self._thread = threading.Thread(target=self._run, name="orderguard-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _baseline(self) -> None:
        """Start from now: what happened while nobody listened is not replayed."""
        latest = self.store.attempts(limit=1)
        self._last_attempt = latest[0].id if latest else 0
        self._since = self.store.now()
        self._states.clear()
        self._halts = self.store.halts()

    def stop(self) -> None:
        self._stop.set()

    def subscribe(self, deliver: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """Call ``deliver(event)`` (from the hub's thread; it must not block) for every event from
        now on: the first subscriber after a quiet spell sets "now" here, in the caller."""
        with self._poll_lock:
            with self._lock:
                first = not self._subscribers
            if first and self._idle:
                self._baseline()
                self._idle = False
            with self._lock:
                self._subscribers.add(deliver)
        return deliver

    def unsubscribe(self, deliver: Callable[[dict[str, Any]], None]) -> None:
        with self._lock:
            self._subscribers.discard(deliver)

    def publish(self, event: dict[str, Any]) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for deliver in subscribers:
            try:
                deliver(event)
            except Exception:  # one broken subscriber never stops the others
                log.exception("event subscriber failed")

    # ---------------------------------------------------------------------------- sources

    def _run(self) -> None:
        listen = getattr(self.store, "listen", None)
        while not self._stop.is_set():
            try:
                with self._poll_lock, self._lock:
                    idle = not self._subscribers
                    if idle:  # nobody listens: no polling, no LISTEN connection
                        self._idle = True
                if idle:
                    self._stop.wait(self.interval)
                    continue
                if listen is not None:
                    self._listen(listen)
                else:
                    self.poll()
                    self._stop.wait(self.interval)
            except OrderGuardError as exc:
                log.warning("event source failed (%s); retrying", exc)
                self._stop.wait(1.0)

    def _listen(self, listen: Any) -> None:
        """PostgreSQL: each notification names what changed, so it is read by its key."""
        for note in listen(timeout=LISTEN_SPAN):
            if "listening" in note:  # LISTEN is in place: catch up on what committed while it was not
                self.poll()
                continue
            with self._poll_lock:
                if "intent" in note:
                    self._publish_intents([self.store.get(note["intent"])])
                if "attempt" in note:
                    self._publish_attempts()
                if "halt" in note:
                    self._publish_halts()
            if self._stop.is_set():
                return
        self.poll()  # the span ended: catch anything a reconnect could have missed

    def poll(self) -> None:
        """Publish what changed since the last poll."""
        with self._poll_lock:
            self._poll()

    def _poll(self) -> None:
        self._publish_attempts()
        now = self.store.now()
        # A change committed with an earlier clock reading than this poll's can land just after
        # it: look one second back, and let the (state, fence) memory drop what was sent already.
        # Only intents created in the last RECENT seconds are scanned (a primary-key range): a
        # change to an older one (a late reconcile) reaches the dashboard at its next refresh.
        changed = self.store.intents(updated_since=self._since - 1.0, ids_from=id_floor(now - RECENT), limit=500)
        self._publish_intents(reversed(changed))
        self._since = now
        self._publish_halts()

    def _publish_attempts(self) -> None:
        for attempt in reversed(self.store.attempts(after_id=self._last_attempt, limit=500)):
            self._last_attempt = max(self._last_attempt, attempt.id)
            if attempt.outcome == "BLOCKED":
                self.publish({"type": "blocked", "attempt": plain(attempt)})

    def _publish_intents(self, records: Iterable[IntentRecord]) -> None:
        for rec in records:
            key = (rec.state.value, rec.fence)
            if self._states.get(rec.id) != key:
                self._states[rec.id] = key
                self.publish({"type": "intent", "intent": plain(rec)})
        if len(self._states) > 10_000:  # forget the oldest half: they are long settled
            for stale in sorted(self._states)[:5_000]:
                del self._states[stale]

    def _publish_halts(self) -> None:
        halts = self.store.halts()
        if halts != self._halts:
            self._halts = halts
            self.publish({"type": "halts", "halts": plain(halts), "at": time.time()})
