"""The HTTP gateway: the same guard over HTTP, for bots in other languages and "Manual trade" buttons.

Every mutating route needs ``Authorization: Bearer <token>``; reads are open (the server binds
127.0.0.1 unless told otherwise). Quantities and prices travel as strings or integers: a JSON
number with a fraction is refused as inexact, like a float in Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..claim import Outcome
from ..cli_json import plain
from ..errors import (
    ClockError,
    ConfigurationError,
    IntentNotFound,
    InvalidIntent,
    InvalidPolicy,
    OrderGuardError,
    StoreError,
)
from ..intent import OrderIntent
from ..policies import canonical_halt_scope
from ..states import State  # noqa: TC001 (FastAPI reads the annotations at runtime)
from ..store.base import SCHEMA_VERSION, BlockReason
from .auth import token_matches
from .events import EventHub
from .metrics import Metrics

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from ..brokers.base import Broker
    from ..guard import Guard
    from ..policies import Policy
    from .config import ServerConfig

Amount = StrictStr | StrictInt
GATEWAY_ACTOR = "operator via gateway"
_AMOUNTS = frozenset({"quantity", "limit_price", "stop_price", "reference_price"})


class IntentIn(BaseModel):
    """An order to submit. Amounts are decimal strings ("101.25") or integers."""

    model_config = ConfigDict(extra="forbid")

    account: StrictStr
    strategy: StrictStr
    symbol: StrictStr
    side: StrictStr = Field(description="BUY or SELL")
    quantity: Amount
    order_type: StrictStr = "MARKET"
    limit_price: Amount | None = None
    stop_price: Amount | None = None
    reference_price: Amount | None = None
    time_in_force: StrictStr = "DAY"
    source: StrictStr = "api"
    tags: dict[StrictStr, StrictStr] = Field(default_factory=dict)

    def to_intent(self) -> OrderIntent:
        data = self.model_dump()
        for name in ("quantity", "limit_price", "stop_price", "reference_price"):
            if isinstance(data[name], str):
                data[name] = data[name].strip()
        return OrderIntent(**data)


class HaltIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: StrictStr = Field(description="'global' or field=value pairs joined by ','")
    reason: Annotated[StrictStr, Field(min_length=1, max_length=500)]
    reducing: bool = False
    by: StrictStr | None = Field(default=None, max_length=100)


class ApiError(BaseModel):
    error: str
    message: str
    field: str | None = None


def _error(status: int, error: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "message": message, "field": field})


class BodyLimit:
    """ASGI middleware: refuse a body larger than ``limit`` bytes (declared or streamed) with 413.

    The body is read (up to the limit) before the app runs, so an oversized one is refused whole
    and nothing of it reaches a route.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = _error(413, "body_too_large", f"request bodies are limited to {self.limit} bytes; nothing was recorded")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                await too_large(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(
    config: ServerConfig, guard: Guard, broker: Broker, token: str, *, events: bool = True,
    on_close: Callable[[], None] | None = None,
) -> FastAPI:
    """The gateway for one guard and broker. ``token`` guards every mutating route; ``on_close``
    runs at shutdown (closing the guard and broker)."""
    metrics = Metrics(guard.store)
    hub = EventHub(guard.store)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if events:
            hub.start()
        try:
            yield
        finally:
            hub.stop()
            if on_close is not None:
                on_close()

    app = FastAPI(
        title="orderguard gateway",
        version=str(SCHEMA_VERSION),
        description="Send each order intent at most once, over HTTP. Mutating routes need a bearer token.",
        lifespan=lifespan,
    )
    policies: dict[str, list[Policy]] = {}
    app.state.guard, app.state.hub, app.state.metrics = guard, hub, metrics

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    def policies_for(strategy: str) -> list[Policy]:
        if strategy not in policies:  # built once per strategy (a trading calendar loads slowly)
            policies[strategy] = config.policies_for(strategy)
        return policies[strategy]

    async def authorized(authorization: Annotated[str | None, Header()] = None) -> None:  # async: no thread hop
        if not token_matches(authorization, token):
            raise HTTPException(status_code=401, detail="a valid 'Authorization: Bearer <token>' header is required")

    # ------------------------------------------------------------------------ errors

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, "malformed_json", f"the body is not valid JSON: {first.get('msg', '')}; nothing was recorded")
        loc = [str(p) for p in first.get("loc", ())[1:]]
        if loc and loc[-1] in ("str", "int") and loc[0] in _AMOUNTS:  # an amount of the wrong JSON type
            return _error(
                422, "invalid_request",
                f"{loc[0]}: send a decimal string (\"1.5\") or an integer; a JSON number with a fraction is "
                "inexact (money is never a float); nothing was recorded", loc[0],
            )
        field = ".".join(loc) or None
        return _error(422, "invalid_request", f"{field or 'body'}: {first.get('msg', 'invalid')}; nothing was recorded", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        headers = dict(exc.headers or {})
        if exc.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if exc.status_code == 405:  # every method of the path, not only those of the route that matched
            headers["Allow"] = ", ".join(_methods_of(app, request.scope))
        return JSONResponse(
            status_code=exc.status_code, content={"error": error, "message": str(exc.detail), "field": None},
            headers=headers or None,
        )

    @app.exception_handler(OrderGuardError)
    async def _orderguard(request: Request, exc: OrderGuardError) -> JSONResponse:
        if isinstance(exc, InvalidIntent):
            return _error(422, "invalid_intent", f"{exc}; nothing was recorded", exc.field)
        if isinstance(exc, (InvalidPolicy, ConfigurationError)):
            return _error(422, "invalid_request", str(exc))
        if isinstance(exc, IntentNotFound):
            return _error(404, "not_found", str(exc))
        if isinstance(exc, (StoreError, ClockError)):
            return _error(503, "ledger_unavailable", f"{exc}")
        return _error(500, "error", str(exc))

    # ----------------------------------------------------------------------- orders

    responses: dict[int | str, dict[str, Any]] = {
        400: {"model": ApiError}, 401: {"model": ApiError}, 409: {"description": "blocked: reason and holder"},
        413: {"model": ApiError}, 422: {"model": ApiError}, 503: {"model": ApiError},
    }

    @app.post("/v1/intents", status_code=201, responses=responses, dependencies=[Depends(authorized)])
    def submit(body: IntentIn) -> JSONResponse:
        """Submit an intent through the configured broker and the strategy's policies.

        201: sent (the body says its state); 409: blocked (reason, and the intent that holds the
        scope); 422: not sent, the venue cannot take this order as given (the message says why);
        503: not sent (the ledger could not vouch for it, or the venue could not be reached). A retry of the same request or a
        second click is blocked by the intent's own scope.
        """
        intent = body.to_intent()
        started = time.perf_counter()
        result = guard.submit(intent, broker, policy=policies_for(intent.strategy))
        metrics.observe(result, time.perf_counter() - started)
        document = {
            "outcome": result.outcome.value, "message": result.message, "attempt_id": result.attempt_id,
            "reason": result.reason.value if result.reason else None, "holder": _holder(result.holder),
            "intent": plain(result.intent) if result.intent else None,
        }
        status = {Outcome.SENT: 201, Outcome.BLOCKED: 409, Outcome.NOT_SENT: 503}[result.outcome]
        if result.unsendable:  # the venue cannot take this order as given: a retry would fail the same way
            status = 422
        return JSONResponse(status_code=status, content=document)  # plain() made it JSON-ready

    @app.get("/v1/intents")
    def list_intents(
        state: Annotated[list[State] | None, Query()] = None,
        strategy: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Intents, newest first."""
        return {"intents": plain(guard.store.intents(states=state or None, strategy=strategy, limit=limit))}

    @app.get("/v1/intents/{ref}", responses={404: {"model": ApiError}})
    def show_intent(ref: str) -> dict[str, Any]:
        """One intent by id or client order id, with the attempts it blocked."""
        record = guard.store.get(ref)
        blocked = guard.store.attempts(holder_id=record.id, limit=100)
        return {"intent": plain(record), "blocked": plain(blocked)}

    @app.get("/v1/attempts")
    def list_attempts(
        blocked: bool | None = None,
        reason: BlockReason | None = None,
        after_id: Annotated[int | None, Query(ge=0)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Attempts (allowed and blocked), newest first."""
        return {"attempts": plain(guard.store.attempts(blocked=blocked, reason=reason, after_id=after_id, limit=limit))}

    @app.get("/v1/runners")
    def list_runners() -> dict[str, Any]:
        """The runner registry with STALE / MIXED_VERSIONS flags and leader leases."""
        from ..cli_control import collect_runners

        return collect_runners(guard.store, "gateway", 3600.0).to_json() | {"ledger": None}

    # ------------------------------------------------------------------------ halts

    @app.get("/v1/halts")
    def list_halts() -> dict[str, Any]:
        """Trading scopes that are not ACTIVE, and recent changes."""
        return {"halts": plain(guard.store.halts()), "history": plain(guard.store.halt_history(limit=50))}

    @app.post("/v1/halts", status_code=201, responses=responses, dependencies=[Depends(authorized)])
    def halt(body: HaltIn) -> dict[str, Any]:
        """Halt (or, with reducing, allow only position-shrinking orders in) a trading scope."""
        record = guard.halt(body.scope, reason=body.reason, reducing=body.reducing, actor=body.by or GATEWAY_ACTOR)
        return {"halt": plain(record)}

    @app.delete("/v1/halts/{scope:path}", responses=responses, dependencies=[Depends(authorized)])
    def resume(
        scope: str, reason: Annotated[str, Query(min_length=1, max_length=500)], by: str | None = None
    ) -> dict[str, Any]:
        """Set a trading scope back to ACTIVE (404 when it is not halted)."""
        canonical = canonical_halt_scope(scope)
        if not any(h.scope == canonical for h in guard.store.halts()):
            raise HTTPException(status_code=404, detail=f"{canonical} is not halted")
        guard.resume(canonical, reason=reason, actor=by or GATEWAY_ACTOR)
        return {"scope": canonical, "state": "ACTIVE"}

    # ---------------------------------------------------------------- live and health

    @app.get("/v1/events", response_class=StreamingResponse)
    async def stream(request: Request) -> StreamingResponse:
        """Server-sent events: ``intent`` (a state change), ``blocked`` (an attempt), ``halts``."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)

        def put(event: dict[str, Any]) -> None:
            with contextlib.suppress(asyncio.QueueFull):  # a stalled client loses events, never blocks others
                inbox.put_nowait(event)

        def deliver(event: dict[str, Any]) -> None:  # called on the hub's thread
            loop.call_soon_threadsafe(put, event)

        hub.subscribe(deliver)

        async def events() -> AsyncIterator[str]:
            try:
                yield "retry: 1000\n\n"
                while not await request.is_disconnected():
                    try:
                        event = await asyncio.wait_for(inbox.get(), timeout=1.0)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    yield f"event: {event['type']}\ndata: {json.dumps(event, default=str)}\n\n"
            finally:
                hub.unsubscribe(deliver)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus metrics: claims, blocks by reason, unknowns, halts, claim latency."""
        body, content_type = metrics.render()
        return PlainTextResponse(body, media_type=content_type)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """200 when the ledger answers, 503 when it does not."""
        try:
            now = guard.store.now()
        except OrderGuardError as exc:
            return JSONResponse(status_code=503, content={"ok": False, "error": str(exc)})
        return JSONResponse({"ok": True, "schema_version": SCHEMA_VERSION, "time": now, "broker": broker.name})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        page = resources.files("orderguard.server").joinpath("dashboard.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    return app


def _methods_of(app: FastAPI, scope: Scope) -> list[str]:
    """The methods the routes of a request's path answer (GET and POST /v1/intents are two routes)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _holder(holder: Any) -> dict[str, Any] | None:
    if holder is None:
        return None
    return {
        "id": holder.id, "client_order_id": holder.client_order_id, "state": holder.state.value,
        "who": holder.who(), "created_at": plain(holder)["created_at"],
    }
