"""``orderguard serve`` configuration: one TOML file, validated (pydantic v2).

```toml
store = "sqlite:////srv/bots/orderguard.db"      # or postgresql://...?schema=...
broker = "paper:///srv/bots/paper.db"
bind = "127.0.0.1:8787"
token_file = "/srv/bots/orderguard.token"       # created 0600 on first start
store_options = { synchronous = "NORMAL" }        # passed to the store
alerts = ["log://", "https://hooks.example/og"]
cors_origins = []                                 # none unless listed
max_body_bytes = 16384

[default]                                         # for strategies not listed below
policies = [{ kind = "once", window = "calendar_day", tz = "America/New_York" }]

[strategies.spx-calendar]
policies = [
  { kind = "once", window = "trading_day", calendar = "XNYS", by = ["strategy"] },
  { kind = "rate", n = 20, per_seconds = 60, trip = true },
]
```
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigurationError, InvalidPolicy
from ..policies import (
    DEFAULT_BY,
    Bucket,
    CalendarDay,
    Cooldown,
    Cycle,
    Ever,
    MaxOpen,
    NotionalLimit,
    OncePer,
    Policy,
    RateLimit,
    TradingDay,
    Window,
    as_policies,
)

DEFAULT_PORT = 8787


class PolicySpec(BaseModel):
    """One policy as written in the TOML file."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["once", "cooldown", "max_open", "rate", "notional"]
    by: list[str] | None = None
    window: Literal["ever", "calendar_day", "trading_day", "bucket", "cycle"] = "ever"
    tz: str = "UTC"
    calendar: str = "XNYS"
    seconds: float | None = None
    cycle: str | None = None
    n: int | None = None
    per_seconds: float | None = None
    amount: str | None = None
    trip: bool = False

    def build(self) -> Policy:
        by = tuple(self.by) if self.by else None
        try:
            if self.kind == "once":
                return OncePer(self._window(), by=by or DEFAULT_BY)
            if self.kind == "cooldown":
                return Cooldown(self._need(self.seconds, "seconds"), by=by or DEFAULT_BY)
            if self.kind == "max_open":
                return MaxOpen(int(self._need(self.n, "n")), by=by or DEFAULT_BY)
            if self.kind == "rate":
                return RateLimit(int(self._need(self.n, "n")), self._need(self.per_seconds, "per_seconds"),
                                 by=by or ("strategy",), trip=self.trip)
            return NotionalLimit(str(self._need(self.amount, "amount")), self._need(self.per_seconds, "per_seconds"),
                                 by=by or ("strategy",), trip=self.trip)
        except InvalidPolicy as exc:
            raise ConfigurationError(f"policy {self.model_dump(exclude_defaults=True)}: {exc}") from None

    def _window(self) -> Window:
        if self.window == "calendar_day":
            return CalendarDay(self.tz)
        if self.window == "trading_day":
            return TradingDay(self.calendar)
        if self.window == "bucket":
            return Bucket(int(self._need(self.seconds, "seconds")))
        if self.window == "cycle":
            return Cycle(self._need(self.cycle, "cycle"))
        return Ever()

    def _need(self, value: Any, name: str) -> Any:
        if value is None:
            raise ConfigurationError(f"a {self.kind!r} policy needs {name} =")
        return value


class StrategyPolicies(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policies: Annotated[list[PolicySpec], Field(min_length=1)]


class ServerConfig(BaseModel):
    """What ``orderguard serve`` runs with."""

    model_config = ConfigDict(extra="forbid")

    store: str = "sqlite:///orderguard.db"
    broker: str
    bind: str = f"127.0.0.1:{DEFAULT_PORT}"
    token_file: str = "orderguard.token"
    alerts: list[str] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: Annotated[int, Field(gt=0, le=1_048_576)] = 16_384
    runner: str = "orderguard-gateway"
    # Passed to the store: SQLite `synchronous` ("FULL" or "NORMAL"), `busy_timeout`; PostgreSQL
    # `schema`, `statement_timeout`, `lock_timeout`, `max_size`.
    store_options: dict[str, str | int | float] = Field(default_factory=dict)
    default: StrategyPolicies = Field(
        default_factory=lambda: StrategyPolicies(policies=[PolicySpec(kind="once", window="calendar_day")])
    )
    strategies: dict[str, StrategyPolicies] = Field(default_factory=dict)

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bind must be HOST:PORT, got {value!r}")
        return value

    @property
    def host(self) -> str:
        return self.bind.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.bind.rpartition(":")[2])

    def policies_for(self, strategy: str) -> list[Policy]:
        chosen = self.strategies.get(strategy, self.default)
        return [spec.build() for spec in chosen.policies]

    def check(self) -> None:
        """Build every policy once, so a bad one fails at start, not at the first order."""
        for name, chosen in (("default", self.default), *self.strategies.items()):
            try:
                as_policies([spec.build() for spec in chosen.policies])
            except InvalidPolicy as exc:
                raise ConfigurationError(f"policies of {name}: {exc}") from None


def load_config(path: str | Path) -> ServerConfig:
    """Read and validate a TOML config; relative paths in it are relative to the file."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read config {file}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config {file} is not valid TOML: {exc}") from None
    token = data.get("token_file")
    if isinstance(token, str) and not Path(token).is_absolute():
        data["token_file"] = str((file.parent / token).resolve())
    try:
        config = ServerConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise ConfigurationError(f"config {file}: {where}: {first['msg']}") from None
    config.check()
    return config
