"""Optional backends, imported only by the runs that use them.

The default install (``pip install -e .``) runs a visit on SQLite and local
files with Prefect's thread runner. Dask, PostgreSQL, S3, Kafka and the
pictures each come with an extra of ``pyproject.toml``; the code that needs one
imports it through :func:`import_extra`, inside the function that uses it, so a
run that does not use a backend never loads it and a missing one is reported
with the extra that provides it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from core.errors import ConfigError


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or say which extra of diapipe installs it.

    Parameters
    ----------
    module : str
        Dotted module name, e.g. ``"confluent_kafka"``.
    extra : str
        The ``pyproject.toml`` extra that installs it, e.g. ``"kafka"``.
    purpose : str
        What needs it, starting the message, e.g. ``"Kafka output"``.

    Returns
    -------
    module
        The imported module.

    Raises
    ------
    ConfigError
        If the module (or one it needs) is not installed:
        ``"Kafka output needs the 'kafka' extra: pip install 'diapipe[kafka]'
        (No module named 'confluent_kafka')"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"{purpose} needs the {extra!r} extra: pip install 'diapipe[{extra}]' ({exc})"
        ) from exc
