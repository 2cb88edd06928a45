"""``python -m kvcellar`` runs the CLI."""

from kvcellar.cli import app

app()
