"""Venue adapters. ``PaperBroker`` is the embedded venue; real venues come as extras."""

from __future__ import annotations

from .base import AccountInfo, Broker, BrokerOrder, OrderRequest, OrderStatus, Position, VenueDedupe
from .paper import PaperBroker, PaperFaults

__all__ = [
    "AccountInfo", "Broker", "BrokerOrder", "OrderRequest", "OrderStatus", "PaperBroker",
    "PaperFaults", "Position", "VenueDedupe",
]
