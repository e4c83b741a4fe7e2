"""CLI sub-commands grouped by topic. Each module here defines ``register(app: typer.Typer)``;
``edgeprune.cli`` calls every one of them, so a topic adds its commands without touching cli.py."""
