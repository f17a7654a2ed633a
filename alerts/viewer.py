"""Look at an alert: three stamps and a light curve (``python -m alerts show``).

Reads any Avro container of alerts in Rubin's schema — diapipe's own
``{visit}_{detector}.avro`` files or packets re-distributed by a broker — and,
for one alert, either prints a summary table (:func:`summarize_alert`) or draws
a PNG (:func:`render_alert`):

- top row: the difference, science and template stamps, each with a zscale
  interval and an asinh stretch, the source marked by a reticle at its stamp
  position ``CRPIX - 1`` (0-based; see :func:`read_stamp`);
- bottom: the light curve, ``psfFlux`` (difference-image flux, nJy) against
  ``midpointMjdTai`` per band — DiaSources as filled symbols with error bars,
  forced photometry as open symbols, the current DiaSource as a large star.

Brokers may add fields (Fink adds ``lc_features``, ``clf``, ``xm``, ...) and
may write a null nested record as a record whose fields are all null
(:func:`normalize_alert` maps that back to ``None``). Rendering uses
matplotlib's object API on an Agg canvas: no pyplot, no global backend change.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.visualization import AsinhStretch, ImageNormalize, ManualInterval, ZScaleInterval

from alerts.store import read_alert_file
from core.errors import InputError
from core.extras import import_extra

__all__ = [
    "BAND_COLORS",
    "Rendered",
    "Stamp",
    "is_solar_system",
    "light_curve",
    "load_alerts",
    "normalize_alert",
    "read_stamp",
    "render_alert",
    "select_alert",
    "show_alert",
    "solar_system_rows",
    "summarize_alert",
]

#: Rubin's recommended band colours (as used in Rubin's community plotting notes).
BAND_COLORS = {
    "u": "#1600ea",
    "g": "#31de1f",
    "r": "#b52626",
    "i": "#370201",
    "z": "#ba52ff",
    "y": "#61a2b3",
}
_MARKERS = {"u": "o", "g": "^", "r": "v", "i": "s", "z": "*", "y": "p"}
_STAMPS = (
    ("cutoutDifference", "difference"),
    ("cutoutScience", "science"),
    ("cutoutTemplate", "template"),
)
_LC_COLUMNS = ["kind", "band", "midpointMjdTai", "psfFlux", "psfFluxErr"]


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------


def normalize_alert(record: Mapping) -> dict:
    """An alert dict with every all-null nested record (a broker's null) set to ``None``.

    Fields the schema does not have are kept; nothing else changes. The input
    is not modified.
    """
    out = dict(record)
    for key, value in out.items():
        if isinstance(value, Mapping) and value and all(v is None for v in value.values()):
            out[key] = None
    return out


def load_alerts(url: str, storage_options: dict | None = None) -> list[dict]:
    """All alerts of an Avro container file (local path or fsspec URL), normalised.

    Raises
    ------
    InputError
        If the file does not exist or is not an Avro container of alerts.
    """
    try:
        records = read_alert_file(url, storage_options)
    except FileNotFoundError as exc:
        raise InputError(f"{url}: no such alert file") from exc
    except (ValueError, EOFError) as exc:  # fastavro: bad magic, truncated file
        raise InputError(f"{url}: not an Avro container file ({exc})") from exc
    alerts = [normalize_alert(r) for r in records]
    bad = [i for i, a in enumerate(alerts) if "diaSourceId" not in a or "diaSource" not in a]
    if bad:
        raise InputError(
            f"{url}: record {bad[0]} has no diaSourceId/diaSource: not a Rubin alert file"
        )
    return alerts


def select_alert(alerts: list[dict], dia_source_id: int | None = None, source: str = "") -> dict:
    """The alert with ``diaSourceId == dia_source_id`` (default: the first one).

    Raises
    ------
    InputError
        If the file holds no alert, or none with that ID (the message lists
        the first few IDs it does hold).
    """
    where = f"{source}: " if source else ""
    if not alerts:
        raise InputError(f"{where}the file holds no alert")
    if dia_source_id is None:
        return alerts[0]
    for alert in alerts:
        if alert["diaSourceId"] == dia_source_id:
            return alert
    ids = ", ".join(str(a["diaSourceId"]) for a in alerts[:5])
    more = f" (and {len(alerts) - 5} more)" if len(alerts) > 5 else ""
    raise InputError(f"{where}no alert with diaSourceId {dia_source_id}; it holds {ids}{more}")


@dataclass(frozen=True)
class Stamp:
    """One cutout, decoded.

    Attributes
    ----------
    image : numpy.ndarray
        Pixel values [y, x] (nJy for Rubin's and diapipe's stamps), NaN where
        the stamp ran off the detector.
    variance : numpy.ndarray or None
        The ``UNCERT`` (Rubin) / second extension plane, nJy², if present.
    x, y : float
        Source position in stamp pixels (0-based), NaN when unknown.
    unit : str
        ``BUNIT`` of the image, ``""`` when absent.
    """

    image: np.ndarray
    variance: np.ndarray | None
    x: float
    y: float
    unit: str


def read_stamp(data: bytes | None, source: Mapping | None = None) -> Stamp | None:
    """Decode a cutout's FITS bytes; the source position comes from ``CUTMINX/Y``.

    Parameters
    ----------
    data : bytes or None
        The ``cutout*`` field of an alert.
    source : mapping, optional
        The alert's ``diaSource`` (``x``, ``y`` in detector pixels), used with
        ``CUTMINX``/``CUTMINY`` only when the stamp has no ``CRPIX``.

    Notes
    -----
    The source position is ``CRPIX - 1`` (0-based; FITS ``CRPIX`` is 1-based
    and the stamp WCS has ``CRVAL`` at the source). Rubin's stamps and
    diapipe's have ``CRPIX = x - CUTMINX`` (``CUTMINX`` is the detector
    position of the pixel before the stamp's first), and on the 7 real LSSTCam
    packets the source's flux centroid lies at ``CRPIX - 1`` within the noise.
    Without ``CRPIX`` the position is ``x - CUTMINX - 1``; without either, the
    stamp centre.

    Returns
    -------
    Stamp or None
        None when ``data`` is None (a source off the image has no stamp).

    Raises
    ------
    InputError
        If the bytes are not a FITS file with a 2-d primary image.
    """
    if data is None:
        return None
    try:
        with fits.open(io.BytesIO(data), memmap=False) as hdus:
            header = hdus[0].header
            image = np.asarray(hdus[0].data, dtype=np.float64)
            variance = (
                np.asarray(hdus[1].data, dtype=np.float64)
                if len(hdus) > 1 and hdus[1].data is not None and hdus[1].data.shape == image.shape
                else None
            )
    except OSError as exc:
        raise InputError(f"cutout is not a FITS file: {exc}") from exc
    if image.ndim != 2:
        raise InputError(f"cutout primary image must be 2-d, got shape {image.shape}")
    ny, nx = image.shape
    x, y = (nx - 1) / 2, (ny - 1) / 2
    sx, sy = (source.get("x"), source.get("y")) if source is not None else (None, None)
    if "CRPIX1" in header and "CRPIX2" in header:
        x, y = float(header["CRPIX1"]) - 1.0, float(header["CRPIX2"]) - 1.0
    elif "CUTMINX" in header and "CUTMINY" in header and sx is not None and sy is not None:
        x, y = float(sx) - header["CUTMINX"] - 1.0, float(sy) - header["CUTMINY"] - 1.0
    return Stamp(image, variance, x, y, str(header.get("BUNIT", "")).strip())


def light_curve(alert: Mapping) -> pd.DataFrame:
    """The alert's photometry as one table, oldest first.

    Returns
    -------
    pandas.DataFrame
        Columns ``kind`` (``"current"``, ``"source"`` for ``prvDiaSources``,
        ``"forced"`` for ``prvDiaForcedSources``), ``band``,
        ``midpointMjdTai`` (MJD, TAI), ``psfFlux`` and ``psfFluxErr`` (nJy,
        difference image). Rows without a finite time or flux are left out;
        an alert with no photometry gives an empty table with these columns.
    """
    parts = []
    for kind, rows in (
        ("forced", alert.get("prvDiaForcedSources") or []),
        ("source", alert.get("prvDiaSources") or []),
        ("current", [alert["diaSource"]] if alert.get("diaSource") else []),
    ):
        if rows:
            df = pd.DataFrame.from_records(rows, columns=_LC_COLUMNS[1:])
            df.insert(0, "kind", kind)
            parts.append(df)
    if not parts:
        return pd.DataFrame(
            {c: pd.Series(dtype=object if c in ("kind", "band") else float) for c in _LC_COLUMNS}
        )
    lc = pd.concat(parts, ignore_index=True)
    for c in ("midpointMjdTai", "psfFlux", "psfFluxErr"):
        lc[c] = pd.to_numeric(lc[c], errors="coerce").astype(np.float64)
    lc["band"] = lc["band"].fillna("?").astype(object)
    keep = np.isfinite(lc["midpointMjdTai"].to_numpy()) & np.isfinite(lc["psfFlux"].to_numpy())
    return lc[keep].sort_values("midpointMjdTai", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------
# summary table
# --------------------------------------------------------------------------


def _fmt(v, spec: str = ".6g") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not np.isfinite(v):
        return "nan"
    if isinstance(v, float | np.floating):
        return format(v, spec)
    return str(v)


def is_solar_system(alert: Mapping) -> bool:
    """Whether the alert is of a known solar-system object.

    That is ``ssSource`` set, or ``ssObjectId`` set with no DiaObject, as Rubin writes them.
    """
    s = alert.get("diaSource") or {}
    return alert.get("ssSource") is not None or bool(
        s.get("ssObjectId") and not s.get("diaObjectId")
    )


def solar_system_rows(alert: Mapping) -> list[tuple[str, str]]:
    """The asteroid's identity and motion as (label, value) rows, for an SSO alert.

    Identity: ``ssObjectId`` and designation (``ssSource``, else ``mpc_orbits``).
    Motion: the predicted rate (deg/day, and its RA·cos δ / Dec parts), the
    measured trail (``trailLength`` arcsec, ``trailAngle`` deg), the offset of
    the detection from the prediction (arcsec, along and across the track),
    then the geometry and the orbit (a, e, i, H). Absent values show as "—".
    """
    s = alert.get("diaSource") or {}
    ss = alert.get("ssSource") or {}
    orb = alert.get("mpc_orbits") or {}
    rate = ss.get("ephRate")
    return [
        ("ssObjectId", _fmt(ss.get("ssObjectId", s.get("ssObjectId")))),
        ("designation", _fmt(ss.get("designation") or orb.get("designation"))),
        (
            "rate [deg/day]",
            f"{_fmt(rate, '.4f')} (RA {_fmt(ss.get('ephRateRa'), '+.4f')}, "
            f"Dec {_fmt(ss.get('ephRateDec'), '+.4f')})"
            + (f" = {rate * 2.5:.3f}″/min" if isinstance(rate, float) else ""),  # 3600″/1440 min
        ),
        (
            "trail [arcsec, deg]",
            f"{_fmt(s.get('trailLength'), '.2f')} at {_fmt(s.get('trailAngle'), '.1f')}",
        ),
        (
            "offset from ephemeris [″]",
            f"{_fmt(ss.get('ephOffset'), '.3f')} (along {_fmt(ss.get('ephOffsetAlongTrack'), '+.3f')}"
            f", across {_fmt(ss.get('ephOffsetCrossTrack'), '+.3f')})",
        ),
        ("predicted V [mag]", _fmt(ss.get("ephVmag"), ".2f")),
        (
            "topo / helio range [AU]",
            f"{_fmt(ss.get('topoRange'), '.3f')} / {_fmt(ss.get('helioRange'), '.3f')}",
        ),
        (
            "phase / elongation [deg]",
            f"{_fmt(ss.get('phaseAngle'), '.1f')} / {_fmt(ss.get('elongation'), '.1f')}",
        ),
        (
            "orbit a [AU], e, i [deg], H",
            f"{_fmt(orb.get('a'), '.3f')}, {_fmt(orb.get('e'), '.3f')}, "
            f"{_fmt(orb.get('i'), '.2f')}, {_fmt(orb.get('h'), '.2f')}",
        ),
    ]


def summarize_alert(alert: Mapping, source: str = "") -> str:
    """A readable plain-text summary of one alert: IDs, position, fluxes, history, object.

    Fluxes in nJy, times in MJD (TAI), coordinates in degrees.
    """
    s = alert["diaSource"]
    obj = alert.get("diaObject")
    prv = alert.get("prvDiaSources") or []
    fs = alert.get("prvDiaForcedSources") or []
    rows = [
        ("file", source),
        ("diaSourceId", alert["diaSourceId"]),
        ("diaObjectId", s.get("diaObjectId")),
        ("ssObjectId", s.get("ssObjectId")),
        ("visit / detector", f"{s.get('visit')} / {s.get('detector')}"),
        ("observation_reason", alert.get("observation_reason")),
        ("target_name", alert.get("target_name")),
        ("ra, dec [deg]", f"{_fmt(s.get('ra'), '.7f')}, {_fmt(s.get('dec'), '.7f')}"),
        ("x, y [px]", f"{_fmt(s.get('x'), '.2f')}, {_fmt(s.get('y'), '.2f')}"),
        ("band", s.get("band")),
        ("midpointMjdTai", _fmt(s.get("midpointMjdTai"), ".6f")),
        ("psfFlux [nJy]", f"{_fmt(s.get('psfFlux'), '.1f')} ± {_fmt(s.get('psfFluxErr'), '.1f')}"),
        ("apFlux [nJy]", f"{_fmt(s.get('apFlux'), '.1f')} ± {_fmt(s.get('apFluxErr'), '.1f')}"),
        (
            "scienceFlux [nJy]",
            f"{_fmt(s.get('scienceFlux'), '.1f')} ± {_fmt(s.get('scienceFluxErr'), '.1f')}",
        ),
        ("snr", _fmt(s.get("snr"), ".2f")),
        ("reliability", _fmt(s.get("reliability"), ".3f")),
        ("prvDiaSources", f"{len(prv)}" + _bands(prv)),
        ("prvDiaForcedSources", f"{len(fs)}" + _bands(fs)),
        ("cutouts", ", ".join(n for k, n in _STAMPS if alert.get(k) is not None) or "none"),
    ]
    lines = [f"{k:<20} {_fmt(v)}" for k, v in rows if not (k == "file" and not source)]
    if obj is None:
        lines.append(f"{'diaObject':<20} none (e.g. a solar-system source)")
        if is_solar_system(alert):
            lines.append("solar-system object")
            lines += [f"  {k:<27} {v}" for k, v in solar_system_rows(alert)]
    else:
        lines.append(
            f"{'diaObject':<20} nDiaSources={obj.get('nDiaSources')}, "
            f"first/last MJD {_fmt(obj.get('firstDiaSourceMjdTai'), '.4f')}"
            f" / {_fmt(obj.get('lastDiaSourceMjdTai'), '.4f')}"
        )
        lines.append(
            f"  {'band':<4} {'Ndata':>6} {'psfFluxMean':>13} {'MeanErr':>10} {'Sigma':>10}"
        )
        for b in BAND_COLORS:
            n = obj.get(f"{b}_psfFluxNdata")
            if n:
                lines.append(
                    f"  {b:<4} {n:>6} {_fmt(obj.get(f'{b}_psfFluxMean'), '.1f'):>13} "
                    f"{_fmt(obj.get(f'{b}_psfFluxMeanErr'), '.1f'):>10} "
                    f"{_fmt(obj.get(f'{b}_psfFluxSigma'), '.1f'):>10}"
                )
    return "\n".join(lines)


def _bands(rows: list[Mapping]) -> str:
    if not rows:
        return ""
    counts = pd.Series([r.get("band") for r in rows], dtype=object).value_counts()
    order = [b for b in BAND_COLORS if b in counts.index] + [
        b for b in counts.index if b not in BAND_COLORS
    ]
    return " (" + ", ".join(f"{b}: {counts[b]}" for b in order) + ")"


# --------------------------------------------------------------------------
# picture
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """What :func:`render_alert` drew.

    Attributes
    ----------
    path : str
        The PNG written.
    size : tuple of int
        (width, height) in pixels.
    stamp_boxes : dict
        Stamp name → (x0, y0, x1, y1), the panel's image area in PNG pixel
        coordinates (origin top left); absent for a missing stamp.
    n_points : dict
        ``kind`` → number of light-curve points drawn (empty for a solar-system
        alert, which shows the asteroid's identity and motion instead).
    motion : bool
        True when the lower panel shows a solar-system object's identity and
        motion (:func:`solar_system_rows` and the predicted motion as an arrow).
    """

    path: str
    size: tuple[int, int]
    stamp_boxes: dict[str, tuple[int, int, int, int]]
    n_points: dict[str, int]
    motion: bool = False


def _draw_motion(fig, ax, alert: Mapping) -> None:
    """The lower panel of a solar-system alert: identity and motion, and the rate as an arrow."""
    ax.set_axis_off()
    rows = solar_system_rows(alert)
    ax.text(0.0, 0.98, "solar-system object", fontsize=12, weight="bold", va="top")
    for k, (label, value) in enumerate(rows):
        y = 0.86 - k * 0.095
        ax.text(0.0, y, label, fontsize=10, va="top", family="monospace")
        ax.text(0.27, y, value, fontsize=10, va="top", family="monospace")
    ss = alert.get("ssSource") or {}
    ra, dec = ss.get("ephRateRa"), ss.get("ephRateDec")
    arrow = fig.add_axes((0.80, 0.08, 0.17, 0.30))
    arrow.set_xlim(-1.2, 1.2)
    arrow.set_ylim(-1.2, 1.2)
    arrow.set_aspect("equal")
    arrow.set_xticks([])
    arrow.set_yticks([])
    arrow.set_title("predicted motion (N up, E left)", fontsize=9)
    if isinstance(ra, float) and isinstance(dec, float) and np.hypot(ra, dec) > 0:
        r = float(np.hypot(ra, dec))
        arrow.annotate(
            "",
            xy=(-ra / r, dec / r),
            xytext=(0.0, 0.0),
            arrowprops={"arrowstyle": "-|>", "color": "#d62728", "lw": 2},
        )
        arrow.text(0, -1.1, f"{r:.4f} deg/day", ha="center", fontsize=9)
    else:
        arrow.text(0, 0, "no rate", ha="center", va="center")


def _norm(image: np.ndarray) -> ImageNormalize:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = ZScaleInterval().get_limits(finite)
        if not hi > lo:
            lo, hi = float(finite.min()), float(finite.max())
        if not hi > lo:
            lo, hi = lo - 1.0, lo + 1.0
    return ImageNormalize(interval=ManualInterval(lo, hi), stretch=AsinhStretch(0.1))


def _draw_stamp(ax, stamp: Stamp | None, title: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if stamp is None:
        ax.set_title(f"{title}: none")
        ax.text(0.5, 0.5, "no stamp", ha="center", va="center", transform=ax.transAxes)
        return
    img = np.ma.masked_invalid(stamp.image)
    ax.imshow(img, origin="lower", cmap="gray", norm=_norm(stamp.image), interpolation="nearest")
    ax.set_facecolor("#3b0f0f")  # NaN padding shows dark red
    if np.isfinite(stamp.x) and np.isfinite(stamp.y):
        # a reticle: four ticks from r to 2r around the source, leaving it visible
        r = max(2.0, 0.08 * min(stamp.image.shape))
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ax.plot(
                [stamp.x + dx * r, stamp.x + 2 * dx * r],
                [stamp.y + dy * r, stamp.y + 2 * dy * r],
                color="#ff3b3b",
                lw=2,
            )
    ny, nx = stamp.image.shape
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    unit = f" [{stamp.unit}]" if stamp.unit else ""
    ax.set_title(f"{title} {nx}×{ny}{unit}", fontsize=10)


def _draw_light_curve(ax, lc: pd.DataFrame) -> dict[str, int]:
    counts = {k: int((lc["kind"] == k).sum()) for k in ("source", "forced", "current")}
    bands = [b for b in BAND_COLORS if b in set(lc["band"])] + sorted(
        set(lc["band"]) - set(BAND_COLORS)
    )
    for b in bands:
        color = BAND_COLORS.get(b, "0.4")
        marker = _MARKERS.get(b, "o")
        for kind, face, size, label in (
            ("forced", "none", 4, f"{b} forced"),
            ("source", color, 5, f"{b} DiaSource"),
        ):
            sel = lc[(lc["band"] == b) & (lc["kind"] == kind)]
            if len(sel):
                ax.errorbar(
                    sel["midpointMjdTai"],
                    sel["psfFlux"],
                    yerr=sel["psfFluxErr"].fillna(0),
                    fmt=marker,
                    ms=size,
                    mfc=face,
                    mec=color,
                    ecolor=color,
                    elinewidth=0.8,
                    alpha=0.55 if kind == "forced" else 0.9,
                    label=label,
                )
    cur = lc[lc["kind"] == "current"]
    for _, row in cur.iterrows():  # one row: the alert's own DiaSource
        color = BAND_COLORS.get(row["band"], "0.4")
        ax.errorbar(
            [row["midpointMjdTai"]],
            [row["psfFlux"]],
            yerr=[0 if pd.isna(row["psfFluxErr"]) else row["psfFluxErr"]],
            fmt="*",
            ms=16,
            mfc=color,
            mec="black",
            mew=1.2,
            ecolor="black",
            zorder=5,
            label=f"{row['band']} this alert",
        )
    ax.axhline(0, color="0.6", lw=0.6, zorder=0)
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    t = lc["midpointMjdTai"].to_numpy()
    if len(t) and np.ptp(t) < 1.0:  # one night: show ±1 day instead of matplotlib's wide default
        ax.set_xlim(t.min() - 1.0, t.max() + 1.0)
    ax.set_xlabel("midpointMjdTai [MJD]")
    ax.set_ylabel("psfFlux (difference image) [nJy]")
    ax.grid(alpha=0.25)
    if len(lc):
        ax.legend(fontsize=8, ncol=min(6, len(bands) * 2 + 1), loc="best", framealpha=0.8)
    else:
        ax.text(0.5, 0.5, "no photometry", ha="center", va="center", transform=ax.transAxes)
    return counts


def render_alert(alert: Mapping, path: str, source: str = "", dpi: int = 100) -> Rendered:
    """Draw one alert's three stamps and light curve to a PNG.

    Parameters
    ----------
    alert : mapping
        One alert (see :func:`load_alerts`).
    path : str
        Output PNG path (local).
    source : str
        Shown in the title (e.g. the file name).
    dpi : int
        Resolution; the figure is 12 × 8.5 in.

    Returns
    -------
    Rendered
    """
    import_extra("matplotlib", "viewer", "Drawing an alert")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = alert["diaSource"]
    # fixed axes positions (figure fractions): constrained layout would double the draw time
    fig = Figure(figsize=(12, 8.5), dpi=dpi)
    FigureCanvasAgg(fig)
    stamp_axes = {}
    for i, (key, name) in enumerate(_STAMPS):
        ax = fig.add_axes((0.035 + i * 0.325, 0.49, 0.30, 0.40))
        stamp = read_stamp(alert.get(key), s)
        _draw_stamp(ax, stamp, name)
        if stamp is not None:
            stamp_axes[name] = ax
    lc_ax = fig.add_axes((0.075, 0.065, 0.905, 0.36))
    motion = is_solar_system(alert)
    if motion:  # no DiaObject, no history: who the asteroid is and how it moves
        _draw_motion(fig, lc_ax, alert)
        counts: dict[str, int] = {}
    else:
        counts = _draw_light_curve(lc_ax, light_curve(alert))
    obj = (
        f"diaObject {s['diaObjectId']}"
        if s.get("diaObjectId")
        else f"ssObject {s['ssObjectId']}"
        if s.get("ssObjectId")
        else "no object"
    )
    fig.suptitle(
        f"diaSourceId {alert['diaSourceId']}  ·  {obj}  ·  band {s.get('band')}  ·  "
        f"MJD {_fmt(s.get('midpointMjdTai'), '.5f')}  ·  ra {_fmt(s.get('ra'), '.5f')}, "
        f"dec {_fmt(s.get('dec'), '.5f')}  ·  psfFlux {_fmt(s.get('psfFlux'), '.0f')} nJy"
        + (f"\n{source}" if source else ""),
        fontsize=10,
    )
    fig.savefig(path, format="png")  # draws: axes positions below are final
    width, height = (int(round(v)) for v in fig.canvas.get_width_height())
    boxes = {}
    for name, ax in stamp_axes.items():
        # the image area (imshow keeps the aspect ratio inside the axes box)
        bb = ax.get_window_extent()
        boxes[name] = (
            int(np.ceil(bb.x0)),
            int(np.ceil(height - bb.y1)),
            int(np.floor(bb.x1)),
            int(np.floor(height - bb.y0)),
        )
    return Rendered(path, (width, height), boxes, counts, motion)


def show_alert(
    url: str,
    dia_source_id: int | None = None,
    png: str | None = None,
    storage_options: dict | None = None,
) -> str:
    """Summary text of one alert of a file; with ``png``, also draw it there.

    Returns the summary (and the PNG path on a last line when drawn).
    """
    alerts = load_alerts(url, storage_options)
    alert = select_alert(alerts, dia_source_id, url)
    text = f"alert {alerts.index(alert) + 1} of {len(alerts)}\n" + summarize_alert(alert, url)
    if png:
        out = render_alert(alert, png, source=url)
        text += f"\nwrote {out.path} ({out.size[0]}×{out.size[1]} px)"
    return text
