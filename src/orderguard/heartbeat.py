"""A guard's heartbeat: keeps its runner registered and its leader lease renewed, and watches
the other runners of its strategy (stale heartbeats, mixed code versions)."""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from .alerts import AlertKind
from .runners import runner_flags
from .store.base import SCHEMA_VERSION, owner_alive, this_host

if TYPE_CHECKING:
    from .guard import Guard

log = logging.getLogger("orderguard")


class Heartbeat(threading.Thread):
    """Keeps a guard's runner registered and its leader lease renewed; watches its peers."""

    def __init__(self, guard: Guard, every: float) -> None:
        super().__init__(name=f"orderguard-heartbeat-{guard.runner}", daemon=True)
        self.guard = guard
        self.every = every
        self.pid = os.getpid()
        self._halt_event = threading.Event()
        self._leading: bool | None = None
        self._flagged: set[tuple[str, str]] = set()

    def stop(self) -> None:
        self._halt_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=max(5.0, 2 * self.every))

    def run(self) -> None:
        while not self._halt_event.wait(self.every):
            try:
                self.beat()
            except Exception as exc:  # the store is down: claims fail closed meanwhile
                log.warning("runner %s heartbeat failed: %s", self.guard.runner, exc)

    def beat(self) -> None:
        guard = self.guard
        if guard.breakers.pending:
            guard.breakers.record_pending()
        known, lease, version = guard.store.heartbeat(guard.runner_id, guard._lease)
        if version != SCHEMA_VERSION and guard._schema_moved is None:
            guard._schema_moved = version
            log.error(
                "runner %s: the ledger was migrated to schema version %s under it (this orderguard knows %s); "
                "it claims nothing more. Restart it with the orderguard the ledger now needs.",
                guard.runner, version, SCHEMA_VERSION,
            )
        if not known and guard.registration is not None:  # stopped or removed by someone: register again
            guard.registration = guard.store.register_runner(guard.registration)
        if guard._lease is not None:
            leading = lease is not None and lease.holder == guard.runner_id
            if leading != self._leading:
                what = "now leads" if leading else "is a standby for"
                log.warning("runner %s %s exclusive %r", guard.runner, what, guard.exclusive)
                if guard.alerts is not None and self._leading is not None:
                    guard.alerts.notify(
                        AlertKind.LEADER, f"exclusive={guard.exclusive}",
                        f"runner {guard.runner} on {this_host()} pid {os.getpid()} {what} exclusive {guard.exclusive!r}",
                    )
                self._leading = leading
        self.check_peers()

    def check_peers(self) -> None:
        """Log and alert stale runners and mixed code versions of this guard's strategy, once each."""
        guard = self.guard
        now = guard.store.now()
        flags = [f for f in runner_flags(guard.store.runners(stopped_within=0), now) if f.runner.strategy == guard.strategy]
        current = {(f.kind, f.runner.id) for f in flags}
        self._flagged &= current  # a runner that recovers and goes stale again is reported again
        for flag in flags:
            key = (flag.kind, flag.runner.id)
            if key in self._flagged:
                continue
            self._flagged.add(key)
            log.error("%s: %s", flag.kind, flag.message)
            if guard.alerts is not None:
                kind = AlertKind.STALE_RUNNER if flag.kind == "STALE" else AlertKind.MIXED_VERSIONS
                guard.alerts.notify(kind, f"strategy={guard.strategy}", flag.message, runner=flag.runner.id)
            r = flag.runner
            if flag.kind == "STALE" and owner_alive(r.host, r.pid, r.started) is False:
                # Its process is gone from this host: it will never heartbeat or send again.
                guard.store.stop_runner(r.id)
                log.warning("runner %s (pid %s) is gone from this host: marked stopped", r.runner, r.pid)
