"""Exit statuses of the CLI and the one stderr line each failure gets (no traceback)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, NoReturn

import typer

from .errors import (
    AuditError,
    ClockError,
    ConfigurationError,
    IntentNotFound,
    InvalidPolicy,
    OrderGuardError,
    SchemaMismatch,
    StoreError,
    StoreLocked,
    StoreUnavailable,
    UnsupportedFilesystem,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

EXIT_OK = 0
EXIT_NOT_CLEAN = 1  # reconcile left something unresolved or found drift; show found no such intent
EXIT_USAGE = 2  # bad option, store URL or broker spec (click's own usage errors are 2 as well)
EXIT_STORE = 3  # the ledger is missing, locked, of another schema, unreadable, or the clock is unusable


class CliFailure(Exception):
    """A failure the CLI itself detected, with its exit status and operator-facing line."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def fail(code: int, message: str) -> NoReturn:
    """Write ``orderguard: error: ...`` as one line on stderr and exit with ``code``."""
    typer.echo(f"orderguard: error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


def explain(exc: OrderGuardError, origin: str = "") -> tuple[int, str]:
    """Exit status and line for an orderguard error: what is wrong and what to do.

    ``origin`` says where the ledger's location came from (``--store``, ...).
    """
    text = str(exc).rstrip()
    if isinstance(exc, StoreLocked):
        return EXIT_STORE, f"{text} Retry once the other process is done, or raise --busy-timeout."
    if isinstance(exc, SchemaMismatch):
        return EXIT_STORE, f"{text} (ledger chosen by {origin})" if origin else text
    if isinstance(exc, UnsupportedFilesystem):
        return EXIT_STORE, text
    if isinstance(exc, StoreUnavailable):
        return EXIT_STORE, (
            f"{text} Check that --store / ORDERGUARD_STORE names an orderguard ledger "
            "('orderguard migrate' creates a new one)."
        )
    if isinstance(exc, (StoreError, ClockError)):
        return EXIT_STORE, text
    if isinstance(exc, (ConfigurationError, InvalidPolicy, AuditError)):
        return EXIT_USAGE, text
    if isinstance(exc, IntentNotFound):
        return EXIT_NOT_CLEAN, text
    return EXIT_NOT_CLEAN, f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def reported(origin: str = "") -> Iterator[None]:
    """Turn orderguard errors and CLI failures into one stderr line and an exit status."""
    try:
        yield
    except CliFailure as failure:
        fail(failure.code, failure.message)
    except OrderGuardError as exc:
        fail(*explain(exc, origin))
