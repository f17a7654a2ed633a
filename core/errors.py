"""The one error hierarchy of diapipe.

Every error the pipeline raises on purpose derives from :class:`PipelineError`.
Messages name the file, table, column and value that is wrong, e.g.
``"science.fits: PHOTCALIB must be > 0, got -1.0"``.

Retry policy hangs on this hierarchy: Prefect tasks retry on
:class:`TransientError` only; everything else fails the detector at once.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error diapipe raises on purpose."""


class InputError(PipelineError, ValueError):
    """Bad input data: a missing file or column, NaN where a value is required, ..."""


class ConfigError(PipelineError, ValueError):
    """A configuration that cannot work (e.g. an unknown alert schema version)."""


class TransientError(PipelineError):
    """A fault that may pass if the same call is made again (network, lock, broker)."""


class ApdbError(PipelineError):
    """The APDB refused an operation (incompatible schema, integrity conflict)."""


class OutOfOrderError(ApdbError):
    """The APDB already holds a later visit of this sky area than the one being processed."""


class StaleLoadError(ApdbError):
    """Another store changed the DiaObjects of a footprint after this detector loaded them.

    Raised by a guarded store (:class:`apdb.interface.RegionGuard`) before it
    writes anything; the detector must be loaded and associated again.
    """


class SchemaVersionError(ApdbError):
    """The database was made with a schema version this code cannot use."""


class TooManyNewObjectsError(PipelineError):
    """Association would create more new DiaObjects than ``maxNewDiaObjects`` allows."""


class IdOverflowError(PipelineError, OverflowError):
    """A value does not fit in its bit field of a packed 64-bit ID."""


class AlertError(PipelineError):
    """An alert could not be built, validated or distributed."""


def one_line(exc: Exception) -> str:
    """A pydantic ``ValidationError`` (or any error) as one line, without the input echoed.

    pydantic's own text repeats each offending input value, which may be a
    secret; this keeps only where each error is and what it says.
    """
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    parts = []
    for e in errors(include_url=False, include_input=False):
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg', '')}" if loc else str(e.get("msg", "")))
    return "; ".join(parts)
