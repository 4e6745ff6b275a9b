"""Typed errors.

A blocked attempt is *not* an error: it is a normal :class:`~orderguard.guard.SubmitResult`.
Everything here means "no order was sent because of this" (or, for broker errors, says what
the venue told us), and each message is written for an operator: what happened and what to do.
"""

from __future__ import annotations


class OrderGuardError(Exception):
    """Base class of every error raised by orderguard."""


class InvalidIntent(OrderGuardError, ValueError):
    """An order intent failed validation. ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"invalid order intent: {field}: {message}")


class InvalidPolicy(OrderGuardError, ValueError):
    """A policy is malformed (unknown field in ``by=``, non-positive window, ...)."""


class ConfigurationError(OrderGuardError, ValueError):
    """The guard or store was configured in a way that cannot be honoured."""


class ClockError(OrderGuardError):
    """The clock cannot be trusted to compute a window key (fail closed: nothing sent)."""


class StoreError(OrderGuardError):
    """The ledger store failed. No order was sent; nothing already recorded was lost."""


class StoreUnavailable(StoreError):
    """The store cannot be opened or reached."""


class StoreLocked(StoreError):
    """The store stayed locked by another writer longer than the busy timeout."""


class SchemaMismatch(StoreError):
    """The store's schema is of another version than this orderguard understands."""


class UnsupportedFilesystem(StoreUnavailable):
    """SQLite file on a network file system, where its locks are not reliable."""


class SendDeadlineExceeded(OrderGuardError):
    """The claim got too old before the send (a paused process): nothing was sent."""


class NotClaimed(OrderGuardError):
    """A blocked claim was used as if it were held (e.g. its client order id was read)."""


class FencedOut(OrderGuardError):
    """A state transition was refused: a newer owner or the reconciler holds the intent now."""


class InvalidTransition(OrderGuardError):
    """A state transition that the intent state machine does not allow."""


class IntentNotFound(OrderGuardError, LookupError):
    """No intent with that id or client order id in the ledger."""


class BrokerError(OrderGuardError):
    """Base for errors reported by a broker adapter."""


class OrderRejected(BrokerError):
    """The venue definitely refused the order: nothing was placed. Frees the scope."""


class AmbiguousOutcome(BrokerError):
    """Timeout, connection reset, 5xx: the order may or may not exist at the venue.

    The intent becomes UNKNOWN and its scope stays blocked until reconciliation.
    """


class OrderNotSent(BrokerError):
    """The adapter refused the order before any byte left for the venue (an order type the venue
    lacks, a quantity it cannot carry exactly, another account's order): nothing was placed.
    Sending the same order again will not help: change it."""


class VenueUnreachable(OrderNotSent):
    """The connection to the venue could not be made (refused, connect timeout): nothing was
    sent. Unlike its parent, this passes: try again later."""


class DuplicateClientOrderId(BrokerError):
    """The venue says this client order id already exists: look it up, never resend."""


class AuditError(OrderGuardError):
    """``orderguard audit`` could not do what was asked; the source was not changed."""


class AuditSourceError(AuditError, ValueError):
    """The trade history cannot be audited as given: unreadable, empty, a column missing or
    holding values of the wrong kind. The message names the table, column and example rows."""


class AuditPlanError(AuditError):
    """A correction plan was refused: edited since it was written, without a backup, already
    applied, or its checks failed on the source it was given. Nothing was changed."""
