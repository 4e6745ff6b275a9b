"""Guard: claim → send → record, at most once per intent (sync, async, decorator)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import sys
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from . import _crash
from .alerts import Notifier
from .breakers import Breakers
from .claim import Claim, Outcome, SubmitResult, _current
from .errors import (
    ConfigurationError,
    DuplicateClientOrderId,
    FencedOut,
    InvalidIntent,
    InvalidTransition,
    OrderGuardError,
    OrderNotSent,
    OrderRejected,
    SchemaMismatch,
    SendDeadlineExceeded,
    StoreError,
    VenueUnreachable,
)
from .halts import HaltCause, HaltRecord
from .heartbeat import Heartbeat
from .intent import OrderIntent
from .policies import PolicyArg, as_policies
from .runners import (
    LeaseRequest,
    RunnerRecord,
    code_files,
    fingerprint,
    git_commit,
    new_runner_id,
)
from .states import TERMINAL, State
from .store import open_store
from .store.base import SCHEMA_VERSION, BlockReason, Caller, TransitionFields, this_host

if TYPE_CHECKING:
    from types import ModuleType

    from .alerts import Sink
    from .brokers.base import Broker, BrokerOrder, OrderRequest
    from .reconcile import ReconcileReport
    from .store.base import AttemptRecord, IntentRecord, Store

log = logging.getLogger("orderguard")
F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_STORE_URL = "sqlite:///orderguard.db"


def _task_name() -> str | None:
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    return task.get_name() if task else None


class Guard:
    """Sends each order intent at most once, across threads, tasks, processes and restarts.

    ``policy`` is the default policy (or list of policies) for calls that give none.
    ``send_deadline`` bounds the time between a claim and its send: a claim older than that is
    not sent (a paused process wakes up too late). It is recorded with the intent, and the
    reconciler treats a pending intent of a still-running owner as lost only ``stale_after``
    seconds after that recorded deadline (an owner that is gone: at once).
    """

    def __init__(
        self,
        store: Store,
        *,
        policy: PolicyArg | None = None,
        runner: str | None = None,
        send_deadline: float = 10.0,
        stale_after: float = 20.0,
        strategy: str | None = None,
        code: Sequence[ModuleType | str | os.PathLike[str]] = (),
        exclusive: str | None = None,
        lease_seconds: float = 15.0,
        heartbeat_every: float = 5.0,
        alerts: Notifier | Sequence[Sink | str] | None = None,
        halt_after_unknown: int | None = 3,
        halt_on_ledger_failure: bool = True,
        register: bool = True,
    ) -> None:
        if not (send_deadline > 0 and stale_after >= 0):
            raise ConfigurationError("need send_deadline > 0 and stale_after >= 0 (seconds)")
        if not (heartbeat_every > 0 and lease_seconds > 0):
            raise ConfigurationError("need heartbeat_every > 0 and lease_seconds > 0 (seconds)")
        if exclusive is not None and not (isinstance(exclusive, str) and 0 < len(exclusive) <= 64):
            raise ConfigurationError("exclusive= names the strategy whose lease this guard competes for (1-64 characters)")
        if halt_after_unknown is not None and halt_after_unknown < 1:
            raise ConfigurationError("halt_after_unknown must be a positive count, or None to never halt on UNKNOWNs")
        self.store = store
        self.default_policy = None if policy is None else as_policies(policy)
        self.runner = runner or os.path.basename(sys.argv[0] or "python") or "python"
        self.send_deadline = float(send_deadline)
        self.stale_after = float(stale_after)
        self.halt_after_unknown = halt_after_unknown
        self.halt_on_ledger_failure = halt_on_ledger_failure
        self.exclusive = exclusive
        self.strategy = strategy or exclusive or self.runner
        self._own_notifier = alerts is not None and not isinstance(alerts, Notifier)
        self.alerts: Notifier | None = (
            alerts if isinstance(alerts, Notifier) or alerts is None else Notifier(alerts)
        )
        self.breakers = Breakers(
            store, self.alerts, self.runner, halt_after_unknown=halt_after_unknown,
            halt_on_ledger_failure=halt_on_ledger_failure,
        )
        self._schema_moved: int | None = None  # set by the heartbeat when the ledger's schema changes
        _GUARDS.add(self)
        self.runner_id = new_runner_id()
        # A lease must be renewed well before it lapses: at least three beats per lease.
        every = min(float(heartbeat_every), float(lease_seconds) / 3) if exclusive else float(heartbeat_every)
        self._lease = LeaseRequest(exclusive, self.runner_id, float(lease_seconds)) if exclusive else None
        self._heartbeat: Heartbeat | None = None
        self.registration: RunnerRecord | None = None
        if register:
            files = code_files(code)
            record = RunnerRecord(
                id=self.runner_id, runner=self.runner, strategy=self.strategy, host=this_host(), pid=os.getpid(),
                started=Caller.current(self.runner).started, version=_version(), fingerprint=fingerprint(files),
                git_commit=git_commit(files), modules=",".join(str(f) for f in files), exclusive=exclusive,
                heartbeat_every=every,
            )
            self.registration = store.register_runner(record)
            log.info(
                "runner %s registered for strategy %s (code %s%s)%s", self.runner, self.strategy, record.fingerprint,
                f", git {record.git_commit[:10]}" if record.git_commit else "",
                f", competing for exclusive {exclusive!r}" if exclusive else "",
            )
            self._heartbeat = Heartbeat(self, every)
            self._heartbeat.check_peers()
            self._heartbeat.start()
            atexit.register(self._stop_registration)  # a script that never closes still stops cleanly

    @classmethod
    def open(cls, url: str | None = None, **options: Any) -> Guard:
        """Open a guard on a ledger URL (default ``sqlite:///orderguard.db``).

        ``options`` are :class:`Guard`'s (``policy``, ``runner``, ``exclusive``, ``alerts``, ...);
        the rest go to the store (SQLite: ``synchronous``, ``busy_timeout``, ``clock``;
        PostgreSQL: ``schema``, timeouts, pool sizes).
        """
        mine = inspect.signature(cls.__init__).parameters
        guard_options = {k: v for k, v in options.items() if k in mine and k != "store"}
        store = open_store(url or DEFAULT_STORE_URL, **{k: v for k, v in options.items() if k not in guard_options})
        try:
            return cls(store, **guard_options)
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        """Stop heartbeating, mark the runner stopped (its lease is given up), close the store.

        Close a guard only when none of its calls is still running: the reconciler on another
        host reads "stopped" as "this owner sends nothing more" once a claim's deadline passed.
        """
        self._stop_registration()
        if self.alerts is not None:
            if self._own_notifier:
                self.alerts.close()
            else:
                self.alerts.flush(timeout=5.0)
        self.store.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stop_registration(self) -> None:
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is None or os.getpid() != heartbeat.pid:  # a forked child never stops its parent's runner
            return
        atexit.unregister(self._stop_registration)
        heartbeat.stop()
        try:
            self.store.stop_runner(self.runner_id)
        except StoreError as exc:
            log.warning("runner %s could not record its stop: %s", self.runner, exc)

    # --------------------------------------------------------------------------- claims

    def _claim(
        self, intent: OrderIntent, policy: PolicyArg | None, state: State, task: str | None, *, opaque: bool = False
    ) -> Claim:
        if not isinstance(intent, OrderIntent):
            raise InvalidIntent("intent", f"must be an OrderIntent, got {type(intent).__name__}")
        policies = as_policies(policy) if policy is not None else self.default_policy
        if policies is None:
            policies = as_policies(None)  # raises the explanatory InvalidPolicy
        caller = Caller.current(self.runner, task)
        if self._schema_moved is not None:
            raise SchemaMismatch(
                f"the ledger was migrated to schema version {self._schema_moved} while this runner ran (it knows "
                f"{SCHEMA_VERSION}); nothing was sent. Restart it with the orderguard the ledger now needs."
            )
        if self.breakers.pending:
            self.breakers.record_pending()
        started = time.monotonic()
        # An opaque owner (a decorated function) may send at any time while it runs: no deadline.
        deadline = None if opaque else self.send_deadline
        decision = self.store.claim(
            intent, policies, caller, state=state, send_deadline=deadline, exclusive=self._lease
        )
        if decision.claimed:
            log.info(decision.message, extra={"intent_id": decision.intent.id if decision.intent else None})
        else:
            level = logging.INFO if decision.reason is BlockReason.NOT_LEADER else logging.WARNING
            log.log(
                level, decision.message,
                extra={
                    "reason": decision.reason.value if decision.reason else None,
                    "holder_id": decision.holder.id if decision.holder else None,
                    "strategy": intent.strategy, "symbol": intent.symbol,
                },
            )
            self.breakers.blocked(decision)
        send_deadline = self.send_deadline
        record = decision.intent
        if decision.lease is not None and record is not None and record.send_by_at is not None:
            # the store cut the deadline to the lease's expiry: a standby may lead after it
            send_deadline = min(send_deadline, max(0.0, record.send_by_at - record.created_at))
        return Claim(self.store, decision, send_deadline=send_deadline, started=started, observer=self.breakers.observe)

    # ------------------------------------------------------------------ breakers & alerts

    def halt(
        self,
        scope: str,
        *,
        reason: str,
        reducing: bool = False,
        cause: HaltCause = HaltCause.OPERATOR,
        keep_existing: bool = False,
        actor: str | None = None,
    ) -> HaltRecord | None:
        """Kill switch: HALT (or, with ``reducing=True``, allow only position-shrinking orders in)
        a trading scope — ``"global"``, ``"strategy=x"``, ``"account=a,symbol=SPX"`` — for every
        process and host using this ledger, until :meth:`resume`. ``keep_existing``: a scope
        already HALTED keeps its first cause and nothing is written (returns None). ``actor``:
        who, recorded with it (default: this runner). Logged and alerted."""
        return self.breakers.halt(
            scope, reason=reason, reducing=reducing, cause=cause, keep_existing=keep_existing, actor=actor
        )

    def resume(self, scope: str, *, reason: str, actor: str | None = None) -> None:
        """Set a trading scope back to ACTIVE (recorded with who and why)."""
        self.breakers.resume(scope, reason=reason, actor=actor)

    def halts(self) -> list[HaltRecord]:
        """Trading scopes that are not ACTIVE."""
        return self.store.halts()

    def claim(self, intent: OrderIntent, *, policy: PolicyArg | None = None) -> AbstractContextManager[Claim]:
        """Claim for existing order code::

            with guard.claim(intent, policy=OneOpen()) as claim:
                if not claim:
                    return claim.reason          # blocked: nothing to do
                order = api.place(..., client_order_id=claim.client_order_id)
                claim.acked(order.id)

        An exception before the client order id was handed out (``client_order_id``,
        ``request()`` or ``intent``) marks the intent ABANDONED (scope free); after it, UNKNOWN
        (scope blocked until reconciled). Reading the id after the send deadline raises
        SendDeadlineExceeded (and the intent is ABANDONED).
        """
        return self._held_claim(intent, policy, _task_name())

    def aclaim(self, intent: OrderIntent, *, policy: PolicyArg | None = None) -> AbstractAsyncContextManager[Claim]:
        """``async with`` form of :meth:`claim`; the ledger writes run in a worker thread."""
        return self._aheld_claim(intent, policy, _task_name())

    @contextmanager
    def _held_claim(
        self, intent: OrderIntent, policy: PolicyArg | None, task: str | None, *, opaque: bool = False
    ) -> Iterator[Claim]:
        claim = self._claim(intent, policy, State.CLAIMED, task, opaque=opaque)
        try:
            yield claim
        except BaseException as exc:
            claim.finish(exc)
            raise
        claim.finish(None)

    @asynccontextmanager
    async def _aheld_claim(
        self, intent: OrderIntent, policy: PolicyArg | None, task: str | None, *, opaque: bool = False
    ) -> AsyncIterator[Claim]:
        claim = await asyncio.to_thread(self._claim, intent, policy, State.CLAIMED, task, opaque=opaque)
        try:
            yield claim
        except BaseException as exc:
            await asyncio.to_thread(claim.finish, exc)
            raise
        await asyncio.to_thread(claim.finish, None)

    # --------------------------------------------------------------------------- submit

    def submit(
        self,
        intent: OrderIntent,
        broker: Broker,
        *,
        policy: PolicyArg | None = None,
        wait_for_fill: float = 0.0,
    ) -> SubmitResult:
        """Claim, send and record in one call. Blocked is a result, not an exception.

        ``wait_for_fill`` seconds: keep looking the order up until it is final or the time is
        up (the scope stays held either way; no timer ever releases it).
        """
        return self._submit(intent, broker, policy, wait_for_fill, _task_name())

    async def asubmit(
        self,
        intent: OrderIntent,
        broker: Broker,
        *,
        policy: PolicyArg | None = None,
        wait_for_fill: float = 0.0,
    ) -> SubmitResult:
        """:meth:`submit` for asyncio: runs in a worker thread, records the task's name."""
        return await asyncio.to_thread(self._submit, intent, broker, policy, wait_for_fill, _task_name())

    def _submit(
        self, intent: OrderIntent, broker: Broker, policy: PolicyArg | None, wait_for_fill: float, task: str | None
    ) -> SubmitResult:
        claim = self._claim(intent, policy, State.SENDING, task)
        if claim.blocked:
            d = claim.decision
            return SubmitResult(Outcome.BLOCKED, d.message, d.attempt_id, reason=d.reason, holder=d.holder)
        _crash.point("after_claim_commit")
        order: BrokerOrder | None = None
        try:
            request = claim.request()
            order = broker.submit(request)
        except (SendDeadlineExceeded, OrderNotSent) as exc:
            result = self._settle(claim, functools.partial(claim.not_sent, str(exc)), Outcome.NOT_SENT, None)
            unsendable = isinstance(exc, OrderNotSent) and not isinstance(exc, VenueUnreachable)
            return dataclasses.replace(result, unsendable=unsendable) if unsendable else result
        except OrderRejected as exc:
            return self._settle(claim, functools.partial(claim.rejected, str(exc)), Outcome.SENT, None)
        except DuplicateClientOrderId as exc:
            # The guard never sends one client order id twice: the venue knowing it means another
            # system (or a wiped ledger) shares the ids. Halt the strategy, then look the order up.
            self.breakers.halt_later(
                intent.strategy, HaltCause.DUPLICATE_CLIENT_ID,
                f"{broker.name} already knows client order id {request.client_order_id} ({exc}); another "
                "sender or a recreated ledger may be reusing ids",
            )
            order = self._lookup_after_duplicate(broker, request.client_order_id, request.symbol)
            if order is None or not _same_order(order, request):
                why = (
                    f"venue reports a duplicate id but lookup finds none: {exc}" if order is None else
                    f"venue reports a duplicate id and holds a different order under it ({order.side} "
                    f"{order.quantity} {order.symbol}, account {order.account}): {exc}"
                )
                return self._settle(claim, functools.partial(claim.unknown, why), Outcome.SENT, None)
        except BaseException as exc:  # AmbiguousOutcome, or anything unclassified: fail safe
            why = f"{type(exc).__name__}: {exc}"
            self._settle(claim, functools.partial(claim.unknown, why), Outcome.SENT, None)
            if isinstance(exc, OrderGuardError):
                return self._result(claim, Outcome.SENT, None)
            raise
        _crash.point("after_send")
        result = self._settle(claim, functools.partial(claim.record, order), Outcome.SENT, order)
        _crash.point("after_ack_recorded")
        if wait_for_fill > 0 and claim.intent.state not in TERMINAL:
            result = self._wait_for_fill(claim, broker, wait_for_fill, order)
        return result

    @staticmethod
    def _lookup_after_duplicate(broker: Broker, coid: str, symbol: str) -> BrokerOrder | None:
        try:
            return broker.lookup(coid, symbol=symbol)
        except Exception as exc:  # the lookup itself failed: stay UNKNOWN
            log.error("lookup of %s after a duplicate-id answer failed: %s", coid, exc)
            return None

    def _settle(
        self, claim: Claim, report: Callable[[], object], outcome: Outcome, order: BrokerOrder | None
    ) -> SubmitResult:
        """Record the venue's answer. After the send, a ledger failure must not read as "not sent"."""
        try:
            report()
        except FencedOut:
            pass  # the reconciler decided first; the result shows its decision
        except InvalidTransition as exc:  # e.g. a lagging lookup older than what is recorded
            log.warning("venue report for %s not recorded: %s", claim.intent.client_order_id, exc)
        except StoreError as exc:
            log.error(
                "order %s reached the send step but recording its outcome failed: %s. The ledger "
                "still holds the scope; run `orderguard reconcile` once the store is back.",
                claim.intent.client_order_id, exc,
            )  # the claim's observer has queued a LEDGER_WRITE_FAILURE halt
        return self._result(claim, outcome, order)

    @staticmethod
    def _result(claim: Claim, outcome: Outcome, order: BrokerOrder | None) -> SubmitResult:
        record = claim.intent
        message = f"{outcome.value} {record.strategy} {record.symbol} {record.side} {record.quantity} as {record.client_order_id}: {record.state.value}"
        if record.note:
            message += f" ({record.note})"
        return SubmitResult(outcome, message, claim.decision.attempt_id, intent=record, order=order)

    def _wait_for_fill(self, claim: Claim, broker: Broker, seconds: float, order: BrokerOrder | None) -> SubmitResult:
        deadline = time.monotonic() + seconds
        coid, fence = claim.intent.client_order_id, claim.intent.fence
        # Stop when final, when the time is up, or when the reconciler took the intent over.
        while claim.intent.state not in TERMINAL and claim.intent.fence == fence:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(0.05, remaining))
            try:
                seen = broker.lookup(coid, symbol=claim.intent.symbol)
            except Exception as exc:
                log.warning("lookup of %s while waiting for its fill failed: %s", coid, exc)
                continue
            if seen is not None:
                order = seen
                self._settle(claim, functools.partial(claim.record, seen), Outcome.SENT, seen)
        return self._result(claim, Outcome.SENT, order)

    # -------------------------------------------------------------------------- decorator

    def once(
        self,
        *,
        intent: OrderIntent | Callable[..., OrderIntent],
        policy: PolicyArg | None = None,
    ) -> Callable[[F], F]:
        """Guard an existing order function::

            @guard.once(policy=OncePer(TradingDay("XNYS"), by=("strategy",)), intent=SPX_ENTRY)
            def execute_calendar_spread_entry(): ...

        A blocked call returns a falsy BLOCKED :class:`SubmitResult` without running the
        function. Inside, :func:`orderguard.current_claim` gives the claim (and its client order
        id). The function is opaque, so once it has started, an exception leaves the intent
        UNKNOWN; a normal return without a report records ACKED. ``intent`` may be a callable
        taking the function's arguments.
        """

        def make_intent(args: tuple[Any, ...], kwargs: dict[str, Any]) -> OrderIntent:
            return intent if isinstance(intent, OrderIntent) else intent(*args, **kwargs)

        def decorate(fn: F) -> F:
            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    async with self._aheld_claim(make_intent(args, kwargs), policy, _task_name(), opaque=True) as claim:
                        if not claim:
                            return _blocked_result(claim)
                        return await _run_claimed(claim, lambda: fn(*args, **kwargs))

                return async_wrapper  # type: ignore[return-value]

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with self._held_claim(make_intent(args, kwargs), policy, _task_name(), opaque=True) as claim:
                    if not claim:
                        return _blocked_result(claim)
                    claim.start_opaque()  # from here the function may send at any moment
                    token = _current.set(claim)
                    try:
                        value = fn(*args, **kwargs)
                    finally:
                        _current.reset(token)
                    _report_done(claim)
                    return value

            return wrapper  # type: ignore[return-value]

        return decorate

    # ------------------------------------------------------------------- reconcile & ops

    def reconcile(
        self, broker: Broker, *, grace: float | None = None, stale_after: float | None = None, wait: bool = True,
        halt_on_drift: bool = True,
    ) -> ReconcileReport:
        """Resolve SENDING/UNKNOWN intents by looking them up at ``broker``; see :mod:`reconcile`.

        Position drift halts the drifting account and symbol (cause DRIFT) unless ``halt_on_drift=False``.
        """
        from .reconcile import reconcile

        grace = broker.lookup_grace if grace is None else grace
        if grace < broker.lookup_grace:
            log.warning(
                "reconciling with grace=%gs, below %s's lookup lag allowance (%gs): an accepted order "
                "could still be invisible and be declared NOT_FOUND", grace, broker.name, broker.lookup_grace,
            )
        return reconcile(
            self.store, broker, grace=grace,
            stale_after=self.stale_after if stale_after is None else stale_after, wait=wait,
            notifier=self.alerts, actor=self.breakers.actor(), halt_on_drift=halt_on_drift,
        )

    def runners(self) -> list[RunnerRecord]:
        """The runner registry (live runners and those stopped in the last hour)."""
        return self.store.runners()

    def intent(self, ref: str) -> IntentRecord:
        """One intent by id or client order id."""
        return self.store.get(ref)

    def intents(self, **filters: Any) -> list[IntentRecord]:
        return self.store.intents(**filters)

    def attempts(
        self, *, intent_id: str | None = None, holder_id: str | None = None, blocked: bool | None = None,
        reason: BlockReason | None = None, since: float | None = None, after_id: int | None = None,
        limit: int = 1000,
    ) -> list[AttemptRecord]:
        return self.store.attempts(
            intent_id=intent_id, holder_id=holder_id, blocked=blocked, reason=reason, since=since,
            after_id=after_id, limit=limit,
        )

    def mark_closed(self, ref: str) -> IntentRecord:
        """The position this intent opened is closed: it stops counting for OneOpen/MaxOpen."""
        return self.store.mark_closed(self.store.get(ref).id)

    def resolve(self, ref: str, state: State, *, note: str) -> IntentRecord:
        """Operator override after checking the venue by hand (fenced: the owner is locked out)."""
        record = self.store.get(ref)
        return self.store.transition(
            record.id, record.fence, State(state), TransitionFields(note=f"operator: {note}"), take_over=True
        )


def _same_order(order: BrokerOrder, request: OrderRequest) -> bool:
    """Whether the venue's order under a client order id is the one this claim asked for."""
    return (order.account, order.symbol, str(order.side).upper(), order.quantity) == (
        request.account, request.symbol, str(request.side).upper(), request.quantity,
    )


def _blocked_result(claim: Claim) -> SubmitResult:
    d = claim.decision
    return SubmitResult(Outcome.BLOCKED, d.message, d.attempt_id, reason=d.reason, holder=d.holder)


async def _run_claimed(claim: Claim, call: Callable[[], Awaitable[Any]]) -> Any:
    await asyncio.to_thread(claim.start_opaque)  # from here the function may send at any moment
    token = _current.set(claim)
    try:
        value = await call()
    finally:
        _current.reset(token)
    await asyncio.to_thread(_report_done, claim)
    return value


def _report_done(claim: Claim) -> None:
    """A decorated function returned: record ACKED unless it reported, or was taken over."""
    if claim.reported:
        return
    with contextlib.suppress(FencedOut):  # the reconciler or an operator settled it meanwhile
        claim.acked()


_GUARDS: weakref.WeakSet[Guard] = weakref.WeakSet()


def _reset_locks_in_child() -> None:
    # A fork may copy a lock held by another thread of the parent: the child must not inherit it.
    for guard in list(_GUARDS):
        guard.breakers.after_fork()


os.register_at_fork(after_in_child=_reset_locks_in_child)


def _version() -> str:
    from . import __version__

    return __version__
