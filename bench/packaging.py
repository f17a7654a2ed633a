"""``python -m bench packaging``: stamps + Avro alerts, diapipe vs the Rubin-style path.

The same alerts (one detector, ``--alerts`` new DiaSources, each with a
DiaObject holding ``depth`` earlier DiaSources and ``2 × depth``
DiaForcedSources, every SDM column filled, ~10 % nulls) are built at history
depths 0, 30, 100 and 345 by

- diapipe: :func:`alerts.cutouts.make_cutouts` (FITS bytes written directly)
  then :func:`alerts.packet.package_alerts` (column-wise Avro encoding,
  history rows encoded once, alerts assembled from byte pieces);
- the Rubin-style path of ``PackageAlertsTask``: per stamp an astropy ``WCS``
  and ``CCDData`` written with ``CCDData.write``; per alert a dict
  (``DataFrame.to_dict("records")`` for the DiaSource, its history and its
  forced sources) serialised with ``fastavro.schemaless_writer``.

Both paths run in the same process on the same inputs; the table gives
milliseconds per alert (wall clock), alerts per second, the speedup, and the
speedup in process CPU time (``cpu x``; steadier on a shared machine). A content check
decodes the first alert of each path and compares them field by field
(stamps excepted: their headers differ by design).

``--visit-case DIR`` instead measures real detectors of the visit benchmark's
cached case (``DIR`` = ``.bench-cache/visit-<key>``, built by ``python -m bench
history``): the process CPU time (``time.process_time``, best of ``--repeat``)
of the load, cutout and package stages of each detector, run through the same
per-detector functions as the flow (:mod:`flows.detector`). The SQLite APDB is
copied to a temporary directory first: nothing is written under ``DIR``.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import fastavro
import numpy as np
import pandas as pd
from astropy.nddata import CCDData, VarianceUncertainty
from astropy.wcs import WCS

from alerts.cutouts import CutoutConfig, cutout_origin, cutout_side, local_wcs, make_cutouts
from alerts.packet import PackagingConfig, decode_alert, load_schema, package_alerts
from apdb import sdm
from core.bundle import DetectorBundle, Exposure, VisitInfo

NX = NY = 2048
MJD = 61000.25


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------


def _fill(rng, table: str, n: int, fixed: dict) -> pd.DataFrame:
    """``n`` rows of SDM ``table`` with every column filled (~10 % nulls where allowed)."""
    cols = {}
    for c in sdm.columns(table):
        if c.name in fixed:
            cols[c.name] = fixed[c.name]
            continue
        null = rng.random(n) < 0.1 if c.nullable else np.zeros(n, bool)
        if c.dtype in ("float32", "float64"):
            v = rng.normal(100.0, 30.0, n)
            cols[c.name] = np.where(null, np.nan, v).astype(c.dtype)
        elif c.dtype in ("bool", "boolean"):
            v = rng.random(n) < 0.05
            cols[c.name] = pd.array(np.where(null, None, v), dtype=c.dtype)
        elif c.dtype.lower().startswith("int"):
            v = rng.integers(0, 1000, n)
            cols[c.name] = pd.array(np.where(null, None, v), dtype=c.dtype)
        elif c.datatype in ("char", "string", "text"):
            cols[c.name] = np.where(null, None, "r").astype(object)
        else:  # timestamps
            cols[c.name] = np.full(n, None, dtype=object)
    return sdm.conform(pd.DataFrame(cols), table)


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [63.35, -47.18]
    w.wcs.crpix = [NX / 2 + 1, NY / 2 + 1]
    c, s = np.cos(np.deg2rad(41.6)), np.sin(np.deg2rad(41.6))
    w.wcs.cd = (0.2 / 3600) * np.array([[-c, s], [s, c]])
    return w


def _psf(side: int) -> np.ndarray:
    r = np.arange(side) - side // 2
    k = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 2.0**2))
    return k / k.sum()


def make_bundle(seed: int) -> DetectorBundle:
    rng = np.random.default_rng(seed)
    wcs = _wcs()

    def exposure(name: str, psf_side: int) -> Exposure:
        return Exposure(
            image=rng.normal(0, 5, (NY, NX)).astype(np.float32),
            mask=rng.integers(0, 4, (NY, NX)).astype(np.int32),
            variance=np.full((NY, NX), 25.0, dtype=np.float32),
            psf=_psf(psf_side),
            wcs=wcs,
            photo_calib=2.5,
            path=f"bench/{name}.fits",
            header={"ROTPA": 41.6},
        )

    visit = VisitInfo(7001, "r", MJD, 30.0, 63.35, -47.18, 41.6, "wfd", "bench_field", (3,))
    return DetectorBundle(
        visit=visit,
        detector=3,
        sources=pd.DataFrame(),
        difference=exposure("difference", 41),
        science=exposure("science", 41),
        template=exposure("template", 55),
    )


def make_inputs(n_alerts: int, depth: int, seed: int, bundle: DetectorBundle):
    """New sources, their objects, DiaSource history (depth each) and forced history (2×depth)."""
    rng = np.random.default_rng(seed + depth)
    obj = np.arange(1_000_000, 1_000_000 + n_alerts, dtype=np.int64)
    x = rng.uniform(0, NX - 1, n_alerts)
    y = rng.uniform(0, NY - 1, n_alerts)
    sky = bundle.difference.wcs.all_pix2world(np.column_stack([x, y]), 0)
    new = _fill(
        rng,
        "DiaSource",
        n_alerts,
        {
            "diaSourceId": np.arange(5_000_000, 5_000_000 + n_alerts, dtype=np.int64),
            "diaObjectId": pd.array(obj, dtype="Int64"),
            "visit": np.full(n_alerts, 7001),
            "detector": np.full(n_alerts, 3),
            "midpointMjdTai": np.full(n_alerts, MJD),
            "ra": sky[:, 0],
            "dec": sky[:, 1],
            "x": x.astype(np.float32),
            "y": y.astype(np.float32),
            "bboxSize": rng.integers(12, 48, n_alerts),
            "band": np.full(n_alerts, "r", dtype=object),
        },
    )
    nh = n_alerts * depth
    hist = _fill(
        rng,
        "DiaSource",
        nh,
        {
            "diaSourceId": np.arange(10_000_000, 10_000_000 + nh, dtype=np.int64),
            "diaObjectId": pd.array(np.repeat(obj, depth), dtype="Int64"),
            "midpointMjdTai": MJD - rng.uniform(1, 359, nh),
        },
    )
    nf = 2 * nh
    forced = _fill(
        rng,
        "DiaForcedSource",
        nf,
        {
            "diaForcedSourceId": np.arange(50_000_000, 50_000_000 + nf, dtype=np.int64),
            "diaObjectId": np.repeat(obj, 2 * depth),
            "midpointMjdTai": MJD - rng.uniform(1, 359, nf),
        },
    )
    objects = _fill(
        rng,
        "DiaObject",
        n_alerts,
        {
            "diaObjectId": obj,
            "ra": sky[:, 0],
            "dec": sky[:, 1],
            "nDiaSources": np.full(n_alerts, depth + 1, dtype=np.int32),
        },
    )
    return new, objects, hist, forced


# --------------------------------------------------------------------------
# the two paths
# --------------------------------------------------------------------------


def run_diapipe(bundle, new, objects, hist, forced):
    c0, t0 = time.process_time(), time.perf_counter()
    cutouts = make_cutouts(new, bundle, CutoutConfig())
    t1 = time.perf_counter()
    batch = package_alerts(new, objects, hist, forced, cutouts, bundle.visit, PackagingConfig())
    t2, c2 = time.perf_counter(), time.process_time()
    return batch.payloads, t1 - t0, t2 - t1, c2 - c0


def _records(df: pd.DataFrame, fields: list[str]) -> list[dict]:
    """``to_dict("records")`` with every null as None (fastavro cannot write pd.NA)."""
    cols = [c for c in fields if c in df.columns]
    sub = df[cols].astype(object)
    return sub.where(sub.notna(), None).to_dict("records")


def _rubin_stamp(exposure: Exposure, x, y, side, x0, y0, ra, dec, cd, rotpa) -> bytes:
    sl = (slice(max(y0, 0), y0 + side), slice(max(x0, 0), x0 + side))
    img = np.full((side, side), np.nan, dtype=np.float32)
    var = np.full((side, side), np.nan, dtype=np.float32)
    sub_i = exposure.image[sl] * np.float32(exposure.photo_calib)
    oy, ox = sl[0].start - y0, sl[1].start - x0
    img[oy : oy + sub_i.shape[0], ox : ox + sub_i.shape[1]] = sub_i
    var[oy : oy + sub_i.shape[0], ox : ox + sub_i.shape[1]] = exposure.variance[sl] * (
        exposure.photo_calib**2
    )
    w = WCS(naxis=2)
    w.wcs.crpix = [x - x0 + 1, y - y0 + 1]
    w.wcs.crval = [ra, dec]
    w.wcs.cd = cd
    ccd = CCDData(
        data=img,
        uncertainty=VarianceUncertainty(var),
        wcs=w,
        unit="nJy",
        meta={"cutMinX": x0, "cutMinY": y0, "rotPa": rotpa},
        psf=exposure.psf,
    )
    buf = io.BytesIO()
    ccd.write(buf, format="fits")
    return buf.getvalue()


def run_rubin_style(bundle, new, objects, hist, forced):
    schema = load_schema(None)
    parsed = schema.parsed
    c0, t0 = time.process_time(), time.perf_counter()
    x = new["x"].to_numpy(np.float64)
    y = new["y"].to_numpy(np.float64)
    side = cutout_side(new["bboxSize"], CutoutConfig())
    x0, y0 = cutout_origin(x, y, side)
    stamps = []
    for kind in ("difference", "science", "template"):
        exp = bundle.image(kind)
        ra, dec, cd = local_wcs(exp, x, y)
        stamps.append(
            [
                _rubin_stamp(
                    exp,
                    x[i],
                    y[i],
                    int(side[i]),
                    int(x0[i]),
                    int(y0[i]),
                    ra[i],
                    dec[i],
                    cd[i],
                    41.6,
                )
                for i in range(len(x))
            ]
        )
    t1 = time.perf_counter()
    f_src = [f for f, _, _ in schema.records["diaSource"].fields]
    f_frc = [f for f, _, _ in schema.records["prvDiaForcedSources"].fields]
    f_obj = [f for f, _, _ in schema.records["diaObject"].fields]
    hist = hist.sort_values(["diaObjectId", "midpointMjdTai", "diaSourceId"])
    forced = forced.sort_values(["diaObjectId", "midpointMjdTai", "diaForcedSourceId"])
    # One dict conversion per table, then grouping (kinder to this path than a
    # per-object DataFrame.to_dict, which is what PackageAlertsTask does).
    hist_by: dict[int, list] = {}
    for rec in _records(hist, f_src):
        hist_by.setdefault(rec["diaObjectId"], []).append(rec)
    forced_by: dict[int, list] = {}
    for rec in _records(forced, f_frc):
        forced_by.setdefault(rec["diaObjectId"], []).append(rec)
    obj_by = {rec["diaObjectId"]: rec for rec in _records(objects, f_obj)}
    payloads = []
    for i, src in enumerate(_records(new, f_src)):
        oid = src["diaObjectId"]
        h = hist_by.get(oid)
        f = forced_by.get(oid)
        alert = {
            "diaSourceId": src["diaSourceId"],
            "observation_reason": bundle.visit.observation_reason,
            "target_name": bundle.visit.target_name,
            "diaSource": src,
            "prvDiaSources": h,
            "prvDiaForcedSources": f,
            "diaObject": obj_by.get(oid),
            "ssSource": None,
            "mpc_orbits": None,
            "cutoutDifference": stamps[0][i],
            "cutoutScience": stamps[1][i],
            "cutoutTemplate": stamps[2][i],
        }
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, alert)
        payloads.append(buf.getvalue())
    t2, c2 = time.perf_counter(), time.process_time()
    return payloads, t1 - t0, t2 - t1, c2 - c0


def _same_content(a: bytes, b: bytes) -> bool:
    schema = load_schema(None)
    ra, rb = decode_alert(a, schema), decode_alert(b, schema)
    for k in ("cutoutDifference", "cutoutScience", "cutoutTemplate"):
        ra.pop(k), rb.pop(k)
    return ra == rb


# --------------------------------------------------------------------------
# real detectors of the visit benchmark's case
# --------------------------------------------------------------------------


def _cpu(fn, repeat: int):
    """(process CPU seconds of the first call, best over ``repeat`` calls, the last result).

    The first call is what a visit pays (each detector runs once, its database
    pages and buffers touched for the first time in the process); the best
    of the repeats is the steadier figure for comparing code.
    """
    times, out = [], None
    for _ in range(max(1, repeat)):
        gc.collect()
        c0 = time.process_time()
        out = fn()
        times.append(time.process_time() - c0)
    return times[0], min(times), out


STAGES = ("load", "cutout", "package")


def run_visit_case(case: Path, detectors: list[int] | None, repeat: int) -> dict:
    """Per-detector CPU of load, cutout and package on a copy of the case's SQLite APDB."""
    from core.bundle import read_visit_info
    from flows import detector as stage
    from flows.config import PipelineConfig

    root = case / "bundles"
    visit_no = next(int(d.name) for d in sorted(root.iterdir()) if (d / "visit.json").exists())
    visit = read_visit_info(str(root), visit_no)
    dets = detectors or list(visit.detectors)[::12]
    with tempfile.TemporaryDirectory(prefix="bench-packaging-") as tmp:
        db = Path(tmp) / "apdb.sqlite3"
        shutil.copyfile(case / "apdb-template.sqlite3", db)
        config = PipelineConfig.model_validate(
            {"apdb": {"url": f"sqlite:///{db}", "auto_create": False}}
        )
        time_mjd = visit.midpointMjdTai + 0.001
        # one-time costs of the process (connection, statements, imports) stay out
        spare = [d for d in visit.detectors if d not in dets]
        if spare:
            stage.load_detector(str(root), visit, spare[0], config)
        rows = []
        for det in dets:
            stage.get_bundle(str(root), visit, det, config)
            load_first, load_s, loaded = _cpu(
                lambda d=det: stage.load_detector(str(root), visit, d, config), repeat
            )
            calibrated = stage.calibrate_detector(str(root), visit, det, config, time_mjd)
            assoc = stage.associate_detector(loaded, calibrated, config, time_mjd)
            forced = stage.forced_detector(str(root), visit, det, config, assoc, time_mjd)
            cut_first, cut_s, cutouts = _cpu(
                lambda d=det, a=assoc: stage.cutout_detector(str(root), visit, d, config, a),
                repeat,
            )
            pack_first, pack_s, batch = _cpu(
                lambda d=det, lo=loaded, a=assoc, f=forced, c=cutouts: stage.package_detector(
                    visit, d, config, lo, a, f, c
                ),
                repeat,
            )
            rows.append(
                {
                    "detector": det,
                    "objects": len(loaded.objects),
                    "sources": len(loaded.sources),
                    "forced": len(loaded.forced),
                    "alerts": len(batch),
                    "history_sources": batch.n_history_sources,
                    "history_forced": batch.n_history_forced,
                    "load_cpu_ms": 1e3 * load_s,
                    "cutout_cpu_ms": 1e3 * cut_s,
                    "package_cpu_ms": 1e3 * pack_s,
                    "load_first_cpu_ms": 1e3 * load_first,
                    "cutout_first_cpu_ms": 1e3 * cut_first,
                    "package_first_cpu_ms": 1e3 * pack_first,
                }
            )
            stage.forget_bundles()
    keys = [f"{stage}{kind}_cpu_ms" for kind in ("", "_first") for stage in STAGES]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    print(
        f"{'detector':>8} {'objects':>7} {'sources':>7} {'forced':>7} {'alerts':>6} "
        f"{'hist':>5} {'hforced':>7} | {'load':>6} {'cutout':>6} {'package':>7} | first call: "
        f"{'load':>6} {'cutout':>6} {'package':>7}  (CPU ms)"
    )
    for r in [*rows, {"detector": "mean", **mean}]:
        counts = (
            f"{r['objects']:>7} {r['sources']:>7} {r['forced']:>7} {r['alerts']:>6} "
            f"{r['history_sources']:>5} {r['history_forced']:>7}"
            if "objects" in r
            else " " * 46
        )
        widths = zip(STAGES, (6, 6, 7), strict=True)
        best = " ".join(f"{r[f'{s}_cpu_ms']:>{w}.1f}" for s, w in widths)
        widths = zip(STAGES, (6, 6, 7), strict=True)
        first = " ".join(f"{r[f'{s}_first_cpu_ms']:>{w}.1f}" for s, w in widths)
        print(f"{r['detector']:>8} {counts} | {best} | {'':>12}{first}")
    return {
        "case": str(case),
        "spec": json.loads((case / "spec.json").read_text()),
        "visit": visit_no,
        "repeat": repeat,
        "rows": rows,
        "headline": {k: round(v, 2) for k, v in mean.items()},
    }


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench packaging", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--alerts",
        type=int,
        default=53,
        help="alerts per depth (default 53 = 10,000 per visit / 189)",
    )
    p.add_argument("--depths", default="0,30,100,345", help="history depths (DiaSources)")
    p.add_argument("--repeat", type=int, default=3, help="diapipe repeats (best kept)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--visit-case",
        type=Path,
        help="measure load/cutout/package CPU per detector on the visit benchmark's cached "
        "case (.bench-cache/visit-<key>; its SQLite APDB is copied, never written)",
    )
    p.add_argument(
        "--detectors", help="with --visit-case: comma-separated detectors (default every 12th)"
    )
    args = p.parse_args(argv)
    if args.visit_case is not None:
        dets = [int(d) for d in args.detectors.split(",")] if args.detectors else None
        return run_visit_case(args.visit_case, dets, max(args.repeat, 1))
    depths = [int(d) for d in args.depths.split(",")]
    bundle = make_bundle(args.seed)
    rows = []
    for depth in depths:
        new, objects, hist, forced = make_inputs(args.alerts, depth, args.seed, bundle)
        best = None
        for _ in range(max(1, args.repeat)):
            gc.collect()
            out = run_diapipe(bundle, new, objects, hist, forced)
            if best is None or sum(out[1:3]) < sum(best[1:3]):
                best = out
        ours, d_cut, d_avro, d_cpu = best
        gc.collect()
        theirs, r_cut, r_avro, r_cpu = run_rubin_style(bundle, new, objects, hist, forced)
        n = args.alerts
        row = {
            "depth": depth,
            "forced": 2 * depth,
            "alerts": n,
            "diapipe_ms_per_alert": 1e3 * (d_cut + d_avro) / n,
            "diapipe_cutout_ms": 1e3 * d_cut / n,
            "diapipe_avro_ms": 1e3 * d_avro / n,
            "rubin_ms_per_alert": 1e3 * (r_cut + r_avro) / n,
            "rubin_cutout_ms": 1e3 * r_cut / n,
            "rubin_avro_ms": 1e3 * r_avro / n,
            "diapipe_alerts_per_s": n / (d_cut + d_avro),
            "rubin_alerts_per_s": n / (r_cut + r_avro),
            "speedup": (r_cut + r_avro) / (d_cut + d_avro),
            "diapipe_cpu_ms_per_alert": 1e3 * d_cpu / n,
            "rubin_cpu_ms_per_alert": 1e3 * r_cpu / n,
            "cpu_speedup": r_cpu / d_cpu,
            "avro_speedup": r_avro / d_avro,
            "mean_alert_kib": float(np.mean([len(b) for b in ours])) / 1024,
            "same_content": _same_content(ours[0], theirs[0]),
        }
        rows.append(row)
    print(
        f"{'depth':>5} {'forced':>6} | {'diapipe ms/alert':>16} {'(stamps':>8} {'avro)':>6} | "
        f"{'rubin ms/alert':>14} {'(stamps':>8} {'avro)':>6} | {'alerts/s':>8} {'rubin/s':>8} "
        f"{'speedup':>7} {'cpu x':>6} {'KiB':>6} same"
    )
    for r in rows:
        print(
            f"{r['depth']:>5} {r['forced']:>6} | {r['diapipe_ms_per_alert']:>16.2f} "
            f"{r['diapipe_cutout_ms']:>8.2f} {r['diapipe_avro_ms']:>6.2f} | "
            f"{r['rubin_ms_per_alert']:>14.2f} {r['rubin_cutout_ms']:>8.2f} {r['rubin_avro_ms']:>6.2f} | "
            f"{r['diapipe_alerts_per_s']:>8.0f} {r['rubin_alerts_per_s']:>8.0f} "
            f"{r['speedup']:>6.1f}x {r['cpu_speedup']:>5.1f}x {r['mean_alert_kib']:>6.1f} "
            f"{r['same_content']}"
        )
    at30 = next((r for r in rows if r["depth"] == 30), rows[0])
    return {
        "rows": rows,
        "alerts": args.alerts,
        "image": [NY, NX],
        "headline": {
            "speedup_depth30": round(at30["speedup"], 2),
            "cpu_speedup_depth30": round(at30["cpu_speedup"], 2),
            "alerts_per_s_depth30": round(at30["diapipe_alerts_per_s"], 1),
        },
    }
