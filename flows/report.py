"""The per-visit picture: stage time per detector (stacked bars) and alerts per detector."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import threading

import numpy as np

from core.extras import import_extra
from flows.stages import STAGES

__all__ = [
    "FILTER_COUNTS",
    "filter_totals",
    "import_picture_modules",
    "png_data_uri",
    "visit_figure_png",
]

#: Per-detector result columns that count the sources each filter took out of the
#: alert stream, and the visit total's name for each (docs/solar-system.md).
FILTER_COUNTS = {
    "ssoassociate_unreliable": "unreliable",
    "ssoassociate_trailed": "trailed",
    "ssoassociate_associated": "solar_system",
    "associate_rejected": "marginal",
    "forced_not_good": "not_good_objects",
}


def filter_totals(rows: list[dict]) -> dict[str, int]:
    """The visit's filter counts: :data:`FILTER_COUNTS` summed over the detectors' rows.

    ``unreliable``: below ``minReliability``, dropped before association;
    ``trailed``: long-trailed, set aside (QA table); ``solar_system``: matched to
    a known solar-system object (no DiaObject); ``marginal``: unassociated,
    failing the new-object cut (QA table); ``not_good_objects``: DiaObjects
    left out of forced photometry by the good-DiaObject rule.
    """
    return {
        name: int(sum(int(r.get(col, 0) or 0) for r in rows)) for col, name in FILTER_COUNTS.items()
    }


def _import_matplotlib() -> None:
    with contextlib.suppress(Exception):  # the picture's own import reports any failure
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.backends.backend_agg
        import matplotlib.collections
        import matplotlib.figure


def import_picture_modules() -> threading.Thread | None:
    """Import matplotlib in a background thread; None when it is not installed.

    The flow starts this while the detectors run, so that the picture drawn
    after them does not wait for the import (~0.4 s in a fresh process, which
    every deployment run is). An import the picture then makes waits for this
    one to finish (Python's per-module import lock).
    """
    if importlib.util.find_spec("matplotlib") is None:
        return None
    thread = threading.Thread(target=_import_matplotlib, name="picture-import", daemon=True)
    thread.start()
    return thread


def visit_figure_png(result: dict) -> bytes:
    """A PNG with two panels: per-stage time per detector, and the alert-count histogram."""
    matplotlib = import_extra("matplotlib", "viewer", "The visit picture")
    matplotlib.use("Agg", force=False)
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    rows = sorted(result["table"], key=lambda r: r["detector"])
    dets = [r["detector"] for r in rows]
    fig = Figure(figsize=(11, 4.2), dpi=90)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(dets))
    bottom = np.zeros(len(dets))
    half = 0.425  # bar half-width
    for k, stage in enumerate((*STAGES, "recover")):
        ms = np.array([float(r.get(f"{stage}_ms", 0.0) or 0.0) for r in rows])
        if ms.any():
            # stacked bars as one collection of rectangles per stage: one artist to draw,
            # not one patch per detector and stage
            top = bottom + ms
            corners = [(x - half, bottom), (x + half, bottom), (x + half, top), (x - half, top)]
            verts = np.stack([np.column_stack(c) for c in corners], axis=1)
            ax1.add_collection(PolyCollection(verts, facecolors=f"C{k}", label=stage))
            bottom = top
    ax1.set_xlim(-1, max(len(dets), 1))
    # headroom above the tallest bar for the legend, drawn at a fixed place: "best" would
    # test it against every bar, which took most of the figure's render time
    ax1.set_ylim(0, max(float(bottom.max(initial=0.0)), 1.0) * 1.4)
    failed = [i for i, r in enumerate(rows) if r.get("status") == "failed"]
    if failed:
        ax1.plot(x[failed], np.zeros(len(failed)), "rx", ms=8, label="failed")
    ax1.set_xlabel("detector")
    ax1.set_ylabel("time (ms)")
    ax1.set_title(f"visit {result['visit']}: stage time per detector")
    step = max(1, len(dets) // 20)
    ax1.set_xticks(x[::step], [str(d) for d in dets[::step]], fontsize=7)
    ax1.legend(fontsize=7, ncol=5, loc="upper left")
    alerts = [int(r.get("package_alerts", 0) or 0) for r in rows if r.get("status") == "ok"]
    ax2.hist(alerts, bins=min(20, max(1, len(set(alerts)))), color="0.4")
    ax2.set_xlabel("alerts per detector")
    ax2.set_ylabel("detectors")
    ax2.set_title(f"{result['alerts']} alerts")
    # fixed margins for the fixed figure size: tight_layout measures every tick label
    # first (~40 % of the figure's time)
    fig.subplots_adjust(left=0.06, right=0.985, bottom=0.12, top=0.92, wspace=0.16)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding in a markdown artifact."""
    return "data:image/png;base64," + base64.b64encode(png).decode()
