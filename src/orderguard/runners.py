"""The runner registry: which processes guard which strategy, with what code, still alive?

Every :class:`~orderguard.Guard` registers its runner (host, pid, start time, orderguard
version, a fingerprint of its strategy code and the git commit) and heartbeats. Two live
runners of one strategy with different code is the stale-runner-after-deploy case; a runner
whose heartbeat stopped without a clean stop is flagged stale. ``exclusive=`` adds a fenced
leader lease so only one runner of a strategy claims at a time.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from .errors import ConfigurationError

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable, Sequence

STALE_AFTER_BEATS = 3  # a runner that missed this many heartbeats (and did not stop) is stale


@dataclass(frozen=True)
class RunnerRecord:
    """One registered runner (a Guard in a process)."""

    id: str
    runner: str
    strategy: str
    host: str
    pid: int
    started: str  # process start marker (see store.base.process_start)
    version: str
    fingerprint: str  # sha256 of the strategy code it was given, 16 hex
    git_commit: str | None
    modules: str  # the code files fingerprinted, comma-separated
    exclusive: str | None  # the leader lease it competes for
    heartbeat_every: float
    registered_at: float = 0.0
    heartbeat_at: float = 0.0
    stopped_at: float | None = None

    def stale(self, now: float) -> bool:
        """Its heartbeat stopped without a clean stop (killed, frozen, host gone)."""
        return self.stopped_at is None and now - self.heartbeat_at > STALE_AFTER_BEATS * self.heartbeat_every

    def live(self, now: float) -> bool:
        return self.stopped_at is None and not self.stale(now)

    def who(self) -> str:
        return f"runner {self.runner} on {self.host} pid {self.pid}"


@dataclass(frozen=True)
class Lease:
    """A fenced leader lease: ``fence`` grows each time the lease changes hands."""

    name: str
    holder: str  # runner id
    fence: int
    expires_at: float
    acquired_at: float


@dataclass(frozen=True)
class LeaseRequest:
    """What a claim of an ``exclusive=`` guard asks the store for."""

    name: str
    runner_id: str
    seconds: float


@dataclass(frozen=True)
class RunnerFlag:
    """Something wrong with a runner, for ``orderguard runners`` and alerts."""

    kind: str  # STALE or MIXED_VERSIONS
    runner: RunnerRecord
    message: str


def runner_flags(runners: Sequence[RunnerRecord], now: float) -> list[RunnerFlag]:
    """Stale runners, and live runners of one strategy running different code."""
    flags = [
        RunnerFlag(
            "STALE", r,
            f"{r.who()} (strategy {r.strategy}) stopped heartbeating {now - r.heartbeat_at:.0f}s ago without "
            "stopping: it was killed, is frozen, or its host is gone. Its UNKNOWN or in-flight intents need "
            "`orderguard reconcile`; if it is only frozen, stop it before it wakes up.",
        )
        for r in runners if r.stale(now)
    ]
    by_strategy: dict[str, list[RunnerRecord]] = {}
    for r in runners:
        if r.live(now):
            by_strategy.setdefault(r.strategy, []).append(r)
    for strategy, live in sorted(by_strategy.items()):
        prints = {r.fingerprint for r in live}
        if len(prints) > 1:
            newest = max(live, key=lambda r: r.registered_at)
            for r in live:
                if r.fingerprint != newest.fingerprint:
                    flags.append(RunnerFlag(
                        "MIXED_VERSIONS", r,
                        f"strategy {strategy} runs different code in {len(live)} live runners: {r.who()} has "
                        f"code {r.fingerprint}{_commit(r)} (registered {_when(r.registered_at)}) while the newest, "
                        f"{newest.who()}, has {newest.fingerprint}{_commit(newest)} (registered "
                        f"{_when(newest.registered_at)}). If the newest runs the release you deployed, an old runner "
                        f"survived the deploy: stop pid {r.pid} on {r.host}.",
                    ))
    return flags


def _when(epoch: float) -> str:
    from .messages import clock_text

    return clock_text(epoch)


def _commit(r: RunnerRecord) -> str:
    return f" (git {r.git_commit[:10]})" if r.git_commit else ""


# ------------------------------------------------------------------------- fingerprints


def code_files(code: Iterable[ModuleType | str | os.PathLike[str]]) -> list[Path]:
    """The source files behind modules or paths; the main script when none are given."""
    files: list[Path] = []
    for item in code:
        if isinstance(item, ModuleType):
            path = getattr(item, "__file__", None)
            if not path:
                raise ConfigurationError(f"module {item.__name__} has no source file to fingerprint")
            files.append(Path(path))
        else:
            files.append(Path(item))
    if not files:
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        if main:
            files.append(Path(main))
    for path in files:
        if not path.is_file():
            raise ConfigurationError(f"strategy code {str(path)!r} is not a readable file")
    return sorted({p.resolve() for p in files})


def fingerprint(files: Sequence[Path]) -> str:
    """sha256 over the files' names and bytes (16 hex); "none" when there is no code to read.

    Computed once per process and file set: the code a process runs is the code it loaded, even
    if a deploy replaces the files under it (which is exactly what the registry must show)."""
    return _fingerprint(tuple(files))


@functools.cache
def _fingerprint(files: tuple[Path, ...]) -> str:
    if not files:
        return "none"
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def git_commit(files: Sequence[Path]) -> str | None:
    """The commit checked out where the first code file lives (None outside git); once per
    process and folder, like :func:`fingerprint`."""
    if not files:
        return None
    return _git_commit(files[0].parent)


@functools.cache
def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) >= 40 else None


def new_runner_id() -> str:
    return uuid.uuid4().hex


def with_times(record: RunnerRecord, now: float) -> RunnerRecord:
    return replace(record, registered_at=now, heartbeat_at=now, stopped_at=None)
