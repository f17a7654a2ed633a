"""Documentation helpers: ``python -m docs.config`` generates docs/configuration.md."""
