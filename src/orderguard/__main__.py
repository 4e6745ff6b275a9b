"""``python -m orderguard`` runs the command line (same as the ``orderguard`` script)."""

from .cli import app

app(prog_name="orderguard")
