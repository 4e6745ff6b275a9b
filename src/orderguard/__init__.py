"""orderguard: send each order intent at most once, provably.

    from orderguard import Guard, OrderIntent, Side, OncePer, TradingDay
    from orderguard.brokers import PaperBroker

    guard = Guard.open("sqlite:///orderguard.db")
    broker = PaperBroker.open("sqlite:///paper.db")
    intent = OrderIntent(account="main", strategy="spx-calendar", symbol="SPX", side=Side.BUY, quantity=4)
    result = guard.submit(intent, broker, policy=OncePer(TradingDay("XNYS"), by=("strategy",)))
"""

from __future__ import annotations

import logging

from .alerts import Alert, AlertKind, AppriseSink, LogSink, Notifier, WebhookSink
from .claim import Claim, Outcome, SubmitResult, current_claim
from .errors import (
    AmbiguousOutcome,
    ClockError,
    ConfigurationError,
    DuplicateClientOrderId,
    FencedOut,
    IntentNotFound,
    InvalidIntent,
    InvalidPolicy,
    InvalidTransition,
    NotClaimed,
    OrderGuardError,
    OrderNotSent,
    OrderRejected,
    SchemaMismatch,
    SendDeadlineExceeded,
    StoreError,
    StoreLocked,
    StoreUnavailable,
    UnsupportedFilesystem,
    VenueUnreachable,
)
from .guard import Guard
from .halts import HaltCause, HaltRecord, TradingState
from .intent import OrderIntent, OrderType, Side, TimeInForce
from .policies import (
    Bucket,
    CalendarDay,
    Cooldown,
    Cycle,
    Ever,
    MaxOpen,
    NotionalLimit,
    OncePer,
    OneOpen,
    Policy,
    RateLimit,
    TradingDay,
)
from .reconcile import ReconcileReport
from .runners import RunnerRecord
from .states import State
from .store.base import AttemptRecord, BlockReason, IntentRecord

__version__ = "0.1.0"

# A library logs; the application decides where it goes (no "No handlers" fallback to stderr).
logging.getLogger("orderguard").addHandler(logging.NullHandler())

__all__ = [
    "Alert", "AlertKind", "AmbiguousOutcome", "AppriseSink", "AttemptRecord", "BlockReason", "Bucket", "CalendarDay", "Claim",
    "ClockError", "ConfigurationError", "Cooldown", "Cycle", "DuplicateClientOrderId", "Ever",
    "FencedOut", "Guard", "HaltCause", "HaltRecord", "IntentNotFound", "IntentRecord", "InvalidIntent", "InvalidPolicy",
    "InvalidTransition", "LogSink", "MaxOpen", "NotClaimed", "Notifier", "NotionalLimit", "OncePer", "OneOpen", "OrderGuardError",
    "OrderIntent", "OrderNotSent", "OrderRejected", "OrderType", "Outcome", "Policy", "RateLimit", "ReconcileReport", "RunnerRecord",
    "SchemaMismatch", "SendDeadlineExceeded", "Side", "State", "StoreError", "StoreLocked",
    "StoreUnavailable", "SubmitResult", "TimeInForce", "TradingDay", "TradingState", "UnsupportedFilesystem", "VenueUnreachable", "WebhookSink",
    "current_claim",
]
