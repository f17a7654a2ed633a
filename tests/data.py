"""Paths of the real test data kept in ``tests/data`` (see its README for sources and licences)."""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"

#: The 7 real LSSTCam alerts (Avro container file).
RUBIN_ALERTS = DATA / "rubin-lsstcam-alerts" / "part-2-918301.avro"

#: Real DECam headers and pixels (single-HDU FITS).
REAL_FITS = DATA / "real-fits"


def data_path(*parts: str) -> Path:
    """A file under ``tests/data``; it must exist (a test never skips for want of data)."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"test data missing: {p} (see tests/data/README.md)")
    return p
