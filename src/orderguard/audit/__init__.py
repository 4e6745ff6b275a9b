"""Forensic audit of trade histories already hit by duplicates (``orderguard[audit]``, on DuckDB).

    from orderguard.audit import audit
    report = audit("trading.db", positions="positions", cash="account")
    for total in report.by_symbol():
        print(total.symbol, total.duplicate_orders, total.phantom_notional)

:func:`audit` reads (never writes) a SQLite or PostgreSQL table or a CSV/Parquet file, finds
bursts of repeated orders and sizes them; :func:`write_plan` writes a reviewable, reversible SQL
correction and :func:`apply_plan` runs it after checking it is intact and still fits the source.
"""

from .clusters import Cluster, Settings, Verdict
from .report import AuditReport, SymbolTotal
from .run import audit

__all__ = ["AuditReport", "Cluster", "Settings", "SymbolTotal", "Verdict", "audit"]
