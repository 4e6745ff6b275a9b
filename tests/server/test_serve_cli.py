"""``orderguard serve --config FILE``: the bearer token (generated once, 0600, shown once, a
world-readable file refused, compared in constant time), the TOML config (valid files give the
right policies, bad ones a ConfigurationError with a clear message), and the real CLI in a
subprocess on a free loopback port.
"""

from __future__ import annotations

import hmac
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from orderguard import Guard
from orderguard.brokers import PaperBroker
from orderguard.errors import ConfigurationError
from orderguard.policies import (
    Bucket,
    CalendarDay,
    Cooldown,
    Ever,
    MaxOpen,
    NotionalLimit,
    OncePer,
    RateLimit,
    TradingDay,
)
from orderguard.server import ServerConfig, load_config
from orderguard.server import run as server_run
from orderguard.server.auth import load_or_create_token, token_matches

REPO = Path(__file__).resolve().parents[2]
BODY = {"account": "main", "strategy": "cli", "symbol": "SPX", "side": "BUY", "quantity": "1"}


# ------------------------------------------------------------------------------ token


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_token_is_generated_0600_then_reused(tmp_path: Path) -> None:
    file = tmp_path / "gateway.token"
    old = os.umask(0)  # even with a permissive umask the file is private
    try:
        token, created = load_or_create_token(file)
    finally:
        os.umask(old)
    assert created is True
    assert _mode(file) == 0o600
    assert len(token) >= 32 and token.isascii() and " " not in token
    assert file.read_text().strip() == token
    again, created_again = load_or_create_token(file)
    assert (again, created_again) == (token, False)
    assert load_or_create_token(tmp_path / "other.token")[0] != token  # random, not derived


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_token_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    file = tmp_path / "gateway.token"
    token, _ = load_or_create_token(file)
    file.chmod(mode)
    with pytest.raises(ConfigurationError, match=r"readable by others .*chmod 600"):
        load_or_create_token(file)
    assert file.read_text().strip() == token  # not rewritten


def test_token_file_without_a_usable_token_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "gateway.token"
    file.write_text("short\n")
    file.chmod(0o600)
    with pytest.raises(ConfigurationError, match="no usable token"):
        load_or_create_token(file)


def test_token_compare_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "k" * 43
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # auth.py calls hmac.compare_digest
    assert token_matches(f"Bearer {token}", token) is True
    assert token_matches(f"Bearer  {token} ", token) is True
    assert token_matches(f"Bearer {token[:-1]}x", token) is False
    assert token_matches(f"Bearer {token[:-1]}", token) is False
    assert token_matches("Bearer \u00e9\u00ff", token) is False  # non-ASCII: refused, no exception
    assert len(calls) == 5 and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
    for header in (None, "", token, f"Basic {token}", "Bearer"):
        assert token_matches(header, token) is False


# ----------------------------------------------------------------------------- config


VALID = """\
store = "sqlite:////srv/bots/orderguard.db"
broker = "paper:///srv/bots/paper.db"
bind = "127.0.0.1:9911"
token_file = "secrets/gateway.token"
alerts = ["log://"]
cors_origins = ["http://desk.example"]
max_body_bytes = 4096

[default]
policies = [{ kind = "once", window = "calendar_day", tz = "America/New_York" }]

[strategies.spx]
policies = [
  { kind = "once", window = "trading_day", calendar = "XNYS", by = ["strategy"] },
  { kind = "rate", n = 20, per_seconds = 60, trip = true },
  { kind = "notional", amount = "250000", per_seconds = 3600, trip = true },
]

[strategies.scalper]
policies = [
  { kind = "cooldown", seconds = 30, by = ["account", "symbol"] },
  { kind = "max_open", n = 3 },
]

[strategies.hourly]
policies = [{ kind = "once", window = "bucket", seconds = 3600 }]
"""


def test_load_config_valid(tmp_path: Path) -> None:
    file = tmp_path / "gateway.toml"
    file.write_text(VALID)
    config = load_config(file)
    assert config.store == "sqlite:////srv/bots/orderguard.db"
    assert (config.host, config.port) == ("127.0.0.1", 9911)
    assert config.token_file == str(tmp_path / "secrets" / "gateway.token")  # relative to the file
    assert config.alerts == ["log://"] and config.cors_origins == ["http://desk.example"]
    assert config.max_body_bytes == 4096

    default = config.policies_for("not-listed")
    assert len(default) == 1 and isinstance(default[0], OncePer)
    assert isinstance(default[0].window, CalendarDay) and default[0].window.tz == "America/New_York"

    once, rate, notional = config.policies_for("spx")
    assert isinstance(once, OncePer) and isinstance(once.window, TradingDay) and once.by == ("strategy",)
    assert once.window.calendar == "XNYS"
    assert isinstance(rate, RateLimit) and (rate.n, rate.per_seconds, rate.trip, rate.by) == (20, 60.0, True, ("strategy",))
    assert isinstance(notional, NotionalLimit)
    assert (notional.amount, notional.per_seconds, notional.trip) == (Decimal("250000"), 3600.0, True)

    cooldown, max_open = config.policies_for("scalper")
    assert isinstance(cooldown, Cooldown) and (cooldown.seconds, cooldown.by) == (30.0, ("account", "symbol"))
    assert isinstance(max_open, MaxOpen) and max_open.n == 3

    (hourly,) = config.policies_for("hourly")
    assert isinstance(hourly, OncePer) and isinstance(hourly.window, Bucket) and hourly.window.seconds == 3600


def test_config_defaults_are_safe() -> None:
    config = ServerConfig(broker="paper:///x.db")
    assert config.host == "127.0.0.1"  # loopback unless told otherwise
    assert config.cors_origins == []
    assert 0 < config.max_body_bytes <= 1_048_576
    (policy,) = config.policies_for("anything")
    assert isinstance(policy, OncePer)
    assert isinstance(policy.window, CalendarDay)
    ever = ServerConfig.model_validate({"broker": "paper:///x.db", "default": {"policies": [{"kind": "once"}]}})
    (once,) = ever.policies_for("x")
    assert isinstance(once, OncePer)
    assert isinstance(once.window, Ever)


BROKER = 'broker = "paper:///srv/paper.db"\n'
BAD_CONFIGS = {
    "not TOML": ('broker = "paper:///x.db"\nstore = \n', r"not valid TOML"),
    "unclosed table": ("[strategies.x\n", r"not valid TOML"),
    "unknown key": (BROKER + "colour = 'red'\n", r"colour: Extra inputs are not permitted"),
    "unknown key in a strategy": (BROKER + "[strategies.x]\npolicies = [{ kind = 'once' }]\nmode = 1\n", r"strategies\.x\.mode"),
    "missing broker": ('store = "sqlite:///x.db"\n', r"broker: Field required"),
    "bind without port": (BROKER + 'bind = "localhost"\n', r"bind must be HOST:PORT"),
    "bind without host": (BROKER + 'bind = ":8787"\n', r"bind must be HOST:PORT"),
    "bind port 0": (BROKER + 'bind = "127.0.0.1:0"\n', r"bind must be HOST:PORT"),
    "bind port too big": (BROKER + 'bind = "127.0.0.1:70000"\n', r"bind must be HOST:PORT"),
    "bind port not a number": (BROKER + 'bind = "127.0.0.1:http"\n', r"bind must be HOST:PORT"),
    "body limit 0": (BROKER + "max_body_bytes = 0\n", r"max_body_bytes"),
    "body limit too big": (BROKER + "max_body_bytes = 10_000_000\n", r"max_body_bytes"),
    "unknown policy kind": (BROKER + "[default]\npolicies = [{ kind = 'twice' }]\n", r"default\.policies\.0\.kind"),
    "unknown policy key": (BROKER + "[default]\npolicies = [{ kind = 'rate', n = 1, per_seconds = 1, burst = 2 }]\n", r"burst"),
    "no policies": (BROKER + "[strategies.x]\npolicies = []\n", r"strategies\.x\.policies"),
    "rate without n": (BROKER + "[strategies.x]\npolicies = [{ kind = 'rate', per_seconds = 60 }]\n", r"'rate' policy needs n ="),
    "cooldown without seconds": (BROKER + "[strategies.x]\npolicies = [{ kind = 'cooldown' }]\n", r"'cooldown' policy needs seconds ="),
    "negative cooldown": (BROKER + "[strategies.x]\npolicies = [{ kind = 'cooldown', seconds = -1 }]\n", r"positive"),
    "zero rate": (BROKER + "[strategies.x]\npolicies = [{ kind = 'rate', n = 0, per_seconds = 60 }]\n", r"positive"),
    "fractional n": (BROKER + "[strategies.x]\npolicies = [{ kind = 'max_open', n = 2.5 }]\n", r"strategies\.x\.policies\.0\.n"),
    "unknown field in by": (BROKER + "[strategies.x]\npolicies = [{ kind = 'once', by = ['colour'] }]\n", r"not an intent field"),
    "unknown time zone": (BROKER + "[default]\npolicies = [{ kind = 'once', window = 'calendar_day', tz = 'Mars/Base' }]\n", r"unknown time zone"),
    "unknown calendar": (BROKER + "[default]\npolicies = [{ kind = 'once', window = 'trading_day', calendar = 'NOPE' }]\n", r"unknown exchange calendar"),
    "float notional amount": (BROKER + "[strategies.x]\npolicies = [{ kind = 'notional', amount = 1000.5, per_seconds = 60 }]\n", r"amount"),
}


@pytest.mark.parametrize("text,message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_is_a_configuration_error_with_a_clear_message(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "gateway.toml"
    file.write_text(text)
    with pytest.raises(ConfigurationError, match=message) as info:
        load_config(file)
    assert str(file) in str(info.value) or "policy" in str(info.value)


def test_missing_config_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_notional_amount_not_a_number_is_a_configuration_error(tmp_path: Path) -> None:
    file = tmp_path / "gateway.toml"
    file.write_text(BROKER + "[strategies.x]\npolicies = [{ kind = 'notional', amount = 'lots', per_seconds = 60 }]\n")
    with pytest.raises(ConfigurationError, match="amount"):
        load_config(file)


def test_policies_guarding_the_same_scope_fail_at_load(tmp_path: Path) -> None:
    file = tmp_path / "gateway.toml"
    file.write_text(BROKER + "[strategies.x]\npolicies = [{ kind = 'once', window = 'ever' }, { kind = 'once', window = 'ever' }]\n")
    with pytest.raises(ConfigurationError, match="same scope"):
        load_config(file)


def test_serve_binds_the_configs_default_loopback_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run.serve hands uvicorn the config's bind: 127.0.0.1:8787 when none is given."""
    paper = tmp_path / "paper.db"
    PaperBroker.open(f"sqlite:///{paper}").close()
    file = tmp_path / "gateway.toml"
    file.write_text(f'store = "sqlite:///{tmp_path / "ledger.db"}"\nbroker = "paper://{paper}"\n'
                    'store_options = { synchronous = "NORMAL", busy_timeout = 2.5 }\n')
    seen: dict[str, Any] = {}

    def fake_run(app: Any, **options: Any) -> None:
        store = app.state.guard.store
        seen.update(options, synchronous=store.synchronous, path=store.path)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    # Without token_file the token goes to ./orderguard.token of the working directory (only a
    # token_file written in the config is resolved against the config's folder).
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    lines: list[str] = []
    server_run.serve(str(file), echo=lines.append)
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8787)
    assert (seen["synchronous"], seen["path"]) == ("NORMAL", str(tmp_path / "ledger.db"))  # store_options applied
    assert "http://127.0.0.1:8787/" in lines[-1]
    assert _mode(cwd / "orderguard.token") == 0o600
    assert (cwd / "orderguard.token").read_text().strip() in lines[0]


def test_unknown_store_option_is_a_configuration_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paper = tmp_path / "paper.db"
    PaperBroker.open(f"sqlite:///{paper}").close()
    file = tmp_path / "gateway.toml"
    file.write_text(f'store = "sqlite:///{tmp_path / "ledger.db"}"\nbroker = "paper://{paper}"\n'
                    f'token_file = "t.token"\nstore_options = {{ synchonous = "NORMAL" }}\n')
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: pytest.fail("must not serve"))
    with pytest.raises(ConfigurationError, match=r"store_options: .*synchonous"):
        server_run.serve(str(file), echo=lambda line: None)
    assert not (tmp_path / "ledger.db").exists()


# -------------------------------------------------------------------- the real CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """``orderguard serve --config FILE`` in a subprocess; stdout read line by line in a thread."""

    def __init__(self, config: Path, *extra: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orderguard", "serve", "--config", str(config), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=config.parent, env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for_line(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.stdout.append(line)
            if needle in line:
                return line
        err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        raise AssertionError(f"no line with {needle!r} from serve; stdout {self.stdout}; stderr {err[-2000:]}")

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str, str]:
        """Stop it like an operator's Ctrl-C (or with ``sig``); its exit status, stdout, stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        while not self.lines.empty():
            self.stdout.append(self.lines.get())
        return self.proc.returncode, "\n".join(self.stdout), err


def _wait_healthy(url: str, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(url + "/healthz", timeout=2)
            if r.status_code == 200:
                return r
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}/healthz never answered 200")
        time.sleep(0.1)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket in LISTEN state on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]) if len(address) == 8 else address)
    return found


@pytest.fixture
def served_config(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    paper = tmp_path / "paper.db"
    PaperBroker.open(f"sqlite:///{paper}").close()
    port = _free_port()
    file = tmp_path / "gateway.toml"
    file.write_text(
        f'store = "sqlite:///{tmp_path / "ledger.db"}"\nbroker = "paper://{paper}"\nbind = "127.0.0.1:{port}"\n'
        'token_file = "gateway.token"\n[default]\npolicies = [{ kind = "once", window = "ever" }]\n'
    )
    yield file, port


@pytest.mark.slow
def test_serve_prints_the_token_once_and_serves(served_config: tuple[Path, int]) -> None:
    file, port = served_config
    url = f"http://127.0.0.1:{port}"
    token_file = file.parent / "gateway.token"

    first = Served(file)
    try:
        first.wait_for_line("bearer token")
        token = first.lines.get(timeout=10).strip()
        first.stdout.append(token)
        first.wait_for_line(f"orderguard gateway on http://127.0.0.1:{port}/")
        assert _mode(token_file) == 0o600 and token_file.read_text().strip() == token
        health = _wait_healthy(url)
        assert health.json()["ok"] is True and health.json()["broker"] == "paper"
        assert _listening_addresses(port) == {"127.0.0.1"}
        assert httpx.post(url + "/v1/intents", json=BODY, timeout=10).status_code == 401
        sent = httpx.post(url + "/v1/intents", json=BODY, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert sent.status_code == 201, sent.text
    finally:
        code, out, err = first.stop()
    assert code == 0, err
    assert out.count(token) == 1 and token not in err

    second = Served(file)
    try:
        second.wait_for_line("orderguard gateway on")
        _wait_healthy(url)
        again = httpx.post(url + "/v1/intents", json=BODY, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert again.status_code == 409 and again.json()["reason"] == "DUPLICATE"  # same token, same ledger
    finally:
        code, out, err = second.stop()
    assert code == 0, err
    assert token not in out and token not in err and "bearer token" not in out
    assert token_file.read_text().strip() == token

    with Guard.open(f"sqlite:///{file.parent / 'ledger.db'}", register=False) as guard:
        assert [i.symbol for i in guard.store.intents()] == ["SPX"]
        runners = [r for r in guard.store.runners() if r.runner == "orderguard-gateway"]
        assert len(runners) == 2 and all(r.stopped_at is not None for r in runners)  # closed on the way out


@pytest.mark.slow
def test_serve_stops_cleanly_on_sigterm(served_config: tuple[Path, int]) -> None:
    file, port = served_config
    served = Served(file)
    try:
        served.wait_for_line("orderguard gateway on")
        _wait_healthy(f"http://127.0.0.1:{port}")
    finally:
        code, _, err = served.stop(signal.SIGTERM)
    with Guard.open(f"sqlite:///{file.parent / 'ledger.db'}", register=False) as guard:
        runners = [r for r in guard.store.runners() if r.runner == "orderguard-gateway"]
    assert [r.stopped_at is not None for r in runners] == [True], runners  # guard and broker closed at shutdown
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the process ends "killed by SIGTERM"
    # as service managers expect (systemd counts it as a clean stop).
    assert code in (0, -signal.SIGTERM), err


@pytest.mark.slow
def test_serve_refuses_a_world_readable_token_file(served_config: tuple[Path, int]) -> None:
    file, port = served_config
    token_file = file.parent / "gateway.token"
    load_or_create_token(token_file)
    token_file.chmod(0o644)
    out = subprocess.run([sys.executable, "-m", "orderguard", "serve", "--config", str(file)],
                         capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert out.returncode == 2
    assert "readable by others" in out.stderr and "chmod 600" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert _listening_addresses(port) == set()


@pytest.mark.slow
def test_serve_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    file = tmp_path / "gateway.toml"
    file.write_text(BROKER + "colour = 'red'\n")
    out = subprocess.run([sys.executable, "-m", "orderguard", "serve", "--config", str(file)],
                         capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == f"orderguard: error: config {file}: colour: Extra inputs are not permitted"
    assert not (tmp_path / "orderguard.token").exists()  # nothing created before the config is valid


@pytest.mark.slow
def test_serve_reports_a_bad_bind_override_in_one_line(served_config: tuple[Path, int]) -> None:
    file, _ = served_config
    out = subprocess.run([sys.executable, "-m", "orderguard", "serve", "--config", str(file), "--bind", "nope"],
                         capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert "Traceback" not in out.stderr and "ValidationError" not in out.stderr, out.stderr[-500:]
    assert out.returncode == 2 and "bind must be HOST:PORT" in out.stderr
