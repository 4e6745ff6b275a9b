"""Which ledger the CLI uses, and opening it without ever creating one by accident.

``--store URL`` (after the command, or before it as a global option), else the
``ORDERGUARD_STORE`` environment variable, else ``./orderguard.db`` made absolute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .cli_errors import EXIT_STORE, CliFailure
from .store import open_store
from .store.sqlite import path_from_url

if TYPE_CHECKING:
    from .store.base import Store

ENV_VAR = "ORDERGUARD_STORE"
DEFAULT_STORE = "orderguard.db"
DEFAULT_BUSY_TIMEOUT = 5.0


@dataclass(frozen=True)
class StoreChoice:
    url: str
    origin: str  # "--store", "ORDERGUARD_STORE" or "the default ./orderguard.db"
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT

    @property
    def path(self) -> str | None:
        """The ledger file, absolute, for SQLite URLs and bare paths (None for other stores).

        Raises ConfigurationError for a malformed SQLite URL.
        """
        if "://" in self.url and not self.url.startswith("sqlite://"):
            return None
        return os.path.abspath(path_from_url(self.url))

    @property
    def where(self) -> str:
        """How the ledger is shown to the operator."""
        try:
            return self.path or self.url
        except ValueError:
            return self.url


def choose_store(command_store: str | None, global_store: str | None, busy_timeout: float) -> StoreChoice:
    """The command's ``--store``, else the global one, else ``ORDERGUARD_STORE``, else the default."""
    given = command_store or global_store
    if given:
        return StoreChoice(given, "--store", busy_timeout)
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return StoreChoice(env, ENV_VAR, busy_timeout)
    return StoreChoice(os.path.abspath(DEFAULT_STORE), "the default ./orderguard.db", busy_timeout)


def open_ledger(choice: StoreChoice, *, create: bool = False, upgrade: bool = False, force: bool = False) -> Store:
    """Open the chosen ledger. With ``create=False`` a missing ledger is an error, never created."""
    path = choice.path
    if path is not None and not create and not os.path.exists(path):
        raise CliFailure(
            EXIT_STORE,
            f"no orderguard ledger at {path} (chosen by {choice.origin}); nothing was created. Point --store "
            f"or {ENV_VAR} at the ledger your bots use, or run 'orderguard migrate' to create a new one.",
        )
    return open_store(
        choice.url, create=create, upgrade=upgrade, force_upgrade=force, busy_timeout=choice.busy_timeout
    )


def ledger_exists(choice: StoreChoice) -> bool:
    """Whether the chosen SQLite ledger file exists (True for stores that are not files)."""
    path = choice.path
    return path is None or os.path.exists(path)
