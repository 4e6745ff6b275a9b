"""Shared fixtures: a fresh ledger and paper venue per test, on real SQLite files."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orderguard import Guard
from orderguard.brokers import PaperBroker


@pytest.fixture(autouse=True)
def _quiet_orderguard_logs() -> None:
    # Tests that care about log lines use caplog; the rest should not flood the output.
    logging.getLogger("orderguard").setLevel(logging.WARNING)


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def paper_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'paper.db'}"


@pytest.fixture
def guard(ledger_url: str) -> Iterator[Guard]:
    g = Guard.open(ledger_url, synchronous="NORMAL")
    yield g
    g.close()


@pytest.fixture
def broker(paper_url: str) -> Iterator[PaperBroker]:
    b = PaperBroker.open(paper_url)
    yield b
    b.close()


@pytest.fixture
def open_broker(paper_url: str) -> Iterator[Callable[..., PaperBroker]]:
    """Open PaperBrokers on the test's venue file (closed at the end)."""
    opened: list[PaperBroker] = []

    def _open(**options: Any) -> PaperBroker:
        b = PaperBroker.open(paper_url, **options)
        opened.append(b)
        return b

    yield _open
    for b in opened:
        b.close()
