"""``orderguard serve``: open the ledger, broker and token from the config, run uvicorn."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

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
        try:
            config = type(config).model_validate({**config.model_dump(), "bind": bind})
        except ValidationError as exc:
            raise ConfigurationError(f"--bind {bind!r}: {exc.errors()[0]['msg']}") from None
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
    def close() -> None:  # at shutdown: uvicorn re-raises SIGTERM after it, so no `finally` would run
        close_broker(broker)
        guard.close()

    try:
        app = create_app(config, guard, broker, token, on_close=close)
    except BaseException:
        close()
        raise
    echo(f"orderguard gateway on http://{config.bind}/ (dashboard), API under /v1, docs at /docs")
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
