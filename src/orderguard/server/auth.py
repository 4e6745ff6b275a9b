"""The gateway's bearer token: generated on first start, kept in a 0600 file, shown once."""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from ..errors import ConfigurationError


def load_or_create_token(path: str | Path) -> tuple[str, bool]:
    """The token in ``path`` and whether it was just created (then the caller shows it once).

    A token file readable by others is refused: it would let any local user place orders.
    """
    file = Path(path)
    if file.exists():
        mode = stat.S_IMODE(file.stat().st_mode)
        if mode & 0o077:
            raise ConfigurationError(
                f"token file {file} is readable by others (mode {mode:o}); run `chmod 600 {file}`"
            )
        token = file.read_text(encoding="ascii").strip()
        if len(token) < 32:
            raise ConfigurationError(f"token file {file} holds no usable token (delete it to generate a new one)")
        return token, False
    token = secrets.token_urlsafe(32)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(token + "\n")
    return token, True


def token_matches(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), token.encode())
