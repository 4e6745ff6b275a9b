"""Guard: claim → send → record, at most once per intent (sync, async, decorator)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from . import _crash
from .claim import Claim, Outcome, SubmitResult, _current
from .errors import (
    ConfigurationError,
    DuplicateClientOrderId,
    FencedOut,
    InvalidIntent,
    InvalidTransition,
    OrderGuardError,
    OrderRejected,
    SendDeadlineExceeded,
    StoreError,
)
from .intent import OrderIntent
from .policies import PolicyArg, as_policies
from .states import TERMINAL, State
from .store import open_store
from .store.base import Caller, TransitionFields

if TYPE_CHECKING:
    from .brokers.base import Broker, BrokerOrder
    from .reconcile import ReconcileReport
    from .store.base import AttemptRecord, BlockReason, IntentRecord, Store

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
    ) -> None:
        if not (send_deadline > 0 and stale_after >= 0):
            raise ConfigurationError("need send_deadline > 0 and stale_after >= 0 (seconds)")
        self.store = store
        self.default_policy = None if policy is None else as_policies(policy)
        self.runner = runner or os.path.basename(sys.argv[0] or "python") or "python"
        self.send_deadline = float(send_deadline)
        self.stale_after = float(stale_after)

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        policy: PolicyArg | None = None,
        runner: str | None = None,
        send_deadline: float = 10.0,
        stale_after: float = 20.0,
        **store_options: Any,
    ) -> Guard:
        """Open a guard on a ledger URL (default ``sqlite:///orderguard.db``).

        ``store_options`` go to the store (SQLite: ``synchronous``, ``busy_timeout``, ``clock``).
        """
        store = open_store(url or DEFAULT_STORE_URL, **store_options)
        return cls(store, policy=policy, runner=runner, send_deadline=send_deadline, stale_after=stale_after)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        started = time.monotonic()
        # An opaque owner (a decorated function) may send at any time while it runs: no deadline.
        deadline = None if opaque else self.send_deadline
        decision = self.store.claim(intent, policies, caller, state=state, send_deadline=deadline)
        if decision.claimed:
            log.info(decision.message, extra={"intent_id": decision.intent.id if decision.intent else None})
        else:
            log.warning(
                decision.message,
                extra={
                    "reason": decision.reason.value if decision.reason else None,
                    "holder_id": decision.holder.id if decision.holder else None,
                    "strategy": intent.strategy, "symbol": intent.symbol,
                },
            )
        return Claim(self.store, decision, send_deadline=self.send_deadline, started=started)

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
        except SendDeadlineExceeded as exc:
            return self._settle(claim, functools.partial(claim.not_sent, str(exc)), Outcome.NOT_SENT, None)
        except OrderRejected as exc:
            return self._settle(claim, functools.partial(claim.rejected, str(exc)), Outcome.SENT, None)
        except DuplicateClientOrderId as exc:
            order = self._lookup_after_duplicate(broker, request.client_order_id)
            if order is None:
                why = f"venue reports a duplicate id but lookup finds none: {exc}"
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
    def _lookup_after_duplicate(broker: Broker, coid: str) -> BrokerOrder | None:
        try:
            return broker.lookup(coid)
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
            )
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
                seen = broker.lookup(coid)
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
                    claim.send_started = True  # opaque function: assume it may send
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
        self, broker: Broker, *, grace: float | None = None, stale_after: float | None = None, wait: bool = True
    ) -> ReconcileReport:
        """Resolve SENDING/UNKNOWN intents by looking them up at ``broker``; see :mod:`reconcile`."""
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
        )

    def intent(self, ref: str) -> IntentRecord:
        """One intent by id or client order id."""
        return self.store.get(ref)

    def intents(self, **filters: Any) -> list[IntentRecord]:
        return self.store.intents(**filters)

    def attempts(
        self, *, intent_id: str | None = None, holder_id: str | None = None, blocked: bool | None = None,
        reason: BlockReason | None = None, since: float | None = None, limit: int = 1000,
    ) -> list[AttemptRecord]:
        return self.store.attempts(
            intent_id=intent_id, holder_id=holder_id, blocked=blocked, reason=reason, since=since, limit=limit
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


def _blocked_result(claim: Claim) -> SubmitResult:
    d = claim.decision
    return SubmitResult(Outcome.BLOCKED, d.message, d.attempt_id, reason=d.reason, holder=d.holder)


async def _run_claimed(claim: Claim, call: Callable[[], Awaitable[Any]]) -> Any:
    claim.send_started = True  # opaque function: assume it may send
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
