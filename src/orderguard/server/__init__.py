"""The HTTP gateway and live dashboard (``orderguard[server]``): ``orderguard serve``."""

from __future__ import annotations

from .app import create_app
from .config import ServerConfig, load_config

__all__ = ["ServerConfig", "create_app", "load_config"]
