"""``orderguard serve``: open the ledger, broker and token from the config, run uvicorn."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..alerts import Notifier
from ..brokers.spec import close_broker, open_broker
from ..errors import ConfigurationError
from ..guard import Guard
from .app import create_app
from .auth import load_or_create_token
from .config import load_config

if TYPE_CHECKING:
    from collections.abc import Callable


def serve(config_path: str, *, bind: str | None = None, echo: Callable[[str], None] = print) -> None:
    import uvicorn

    config = load_config(config_path)
    if bind is not None:
        config = config.model_copy(update={"bind": bind})
        config = type(config).model_validate(config.model_dump())
    token, created = load_or_create_token(config.token_file)
    if created:
        echo(f"bearer token for mutating routes (shown once; kept in {config.token_file}, mode 0600):\n  {token}")
    notifier = Notifier(config.alerts) if config.alerts else None
    try:
        guard = Guard.open(
            config.store, runner=config.runner, strategy=config.runner, alerts=notifier, **config.store_options
        )
    except TypeError as exc:  # an option the store does not take
        raise ConfigurationError(f"store_options: {exc}") from None
    broker = open_broker(config.broker)
    try:
        app = create_app(config, guard, broker, token)
        echo(f"orderguard gateway on http://{config.bind}/ (dashboard), API under /v1, docs at /docs")
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        close_broker(broker)
        guard.close()
