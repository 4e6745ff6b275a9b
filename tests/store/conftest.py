"""The store conformance suite runs against every store: one factory per store kind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orderguard.store.base import Store
from orderguard.store.sqlite import SQLiteStore

StoreFactory = Callable[..., Store]
STORE_KINDS = ["sqlite"]


class FakeClock:
    """A clock the test moves by hand (Unix seconds)."""

    def __init__(self, start: float = 1_763_650_800.0) -> None:  # 2025-11-20 15:00 UTC, a Thursday session
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=STORE_KINDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """``make_store(clock=...)`` opens a fresh store of the parametrized kind on a new ledger."""
    opened: list[Store] = []
    counter = iter(range(1_000_000))

    def factory(clock: Callable[[], float] | None = None, **options: object) -> Store:
        kind = request.param
        if kind == "sqlite":
            path = tmp_path / f"ledger-{next(counter)}.db"
            extra: dict[str, object] = {"synchronous": "NORMAL", **options}
            if clock is not None:
                extra["clock"] = clock
            store: Store = SQLiteStore(str(path), **extra)  # type: ignore[arg-type]
        else:  # pragma: no cover - new store kinds register here
            raise AssertionError(f"unknown store kind {kind}")
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory, clock: FakeClock) -> Store:
    return make_store(clock=clock)
