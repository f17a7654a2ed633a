"""Daytime de-duplication of DiaObjects: merge the pieces of split objects.

``process_dedup`` is the Prefect flow (deployment ``dedup-daily`` in
``prefect.yaml``); ``python -m flows.dedup URL [--dry-run]`` runs it on an
APDB. What is a split and which ID survives is :mod:`tasks.dedup`; this module
reads the APDB region by region, recomputes the survivors' summaries with the
pipeline's own :func:`tasks.summarise.summarise`, and writes each region's
merges in one transaction (:meth:`apdb.Apdb.merge_objects`).

Regions
-------
The sky is cut into HEALPix pixels (nest) of order ``dedup.region_order``;
only pixels holding a current DiaObject are visited, in pixel order. A region
reads the DiaObjects of a circle around its pixel padded by
``(max_passes + 1) * max_distance_arcsec``, and owns the groups whose
survivor lies in the pixel itself: a group near a pixel edge is merged by
exactly one region, whichever pixel holds its survivor, and the members may
lie across the edge. Regions run one after another, each reading what the
previous ones committed.

Idempotence and interruption
----------------------------
A region's merges are one transaction: a run killed part-way leaves every
region either fully merged or untouched, and the next run picks up the
untouched ones. Within a region the grouping is repeated on the merged
objects (up to ``max_passes``) until it finds nothing, so a second run finds
no group and writes nothing. Before writing, the current version of every
object involved is checked against the one read; when a store or another run
changed one in between, the region is skipped (``conflicts``) and left for the
next run.

Summaries
---------
A survivor's new version is :func:`tasks.summarise.summarise` of the DiaSources
of the whole group (and their forced photometry, reassigned as the APDB will
store it) in the APDB's history window before the group's last detection
(``apdb.history_days``), the window the pipeline summarises an object from;
its validity starts at the run's ``time_mjd`` (default: now, TAI), which also
closes the merged-away objects' versions.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, replace
from urllib.parse import quote

import hpgeom
import numpy as np
import pandas as pd
from astropy.time import Time
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from scipy.spatial import cKDTree

from apdb import Apdb, Circle, make_apdb, sdm
from apdb.config import ApdbConfig
from core.errors import ApdbError, InputError
from flows.config import PipelineConfig
from flows.stages import retry_on_transient
from tasks.dedup import DedupConfig, find_groups
from tasks.summarise import SummaryConfig, summarise

__all__ = ["DedupResult", "RegionResult", "dedup_region", "main", "process_dedup", "run_dedup"]

COUNTS = (
    "groups",
    "objects_merged",
    "sources_reassigned",
    "forced_reassigned",
    "forced_dropped",
)


@dataclass(frozen=True)
class RegionResult:
    """What the de-duplication did (or, in a dry run, would do) in one region."""

    pixel: int
    n_objects: int
    groups: int = 0
    objects_merged: int = 0
    sources_reassigned: int = 0
    forced_reassigned: int = 0
    forced_dropped: int = 0
    conflict: str | None = None
    merges: pd.DataFrame | None = None


class DedupResult(dict):
    """The flow's return value: a plain dict with these keys.

    ``regions`` (visited), ``regions_merged`` (with at least one merge),
    ``conflicts`` (regions skipped because an object changed while they were
    computed), ``groups``, ``objects_merged``, ``sources_reassigned``,
    ``forced_reassigned``, ``forced_dropped``, ``dry_run``, ``time_mjd``,
    ``wall_s``.
    """


def _now_mjd_tai() -> float:
    return float(Time.now().tai.mjd)


def region_circle(pixel: int, order: int, pad_deg: float) -> Circle:
    """A circle holding HEALPix nest pixel ``pixel`` of ``order``, padded by ``pad_deg``."""
    nside = hpgeom.order_to_nside(order)
    ra0, dec0 = hpgeom.pixel_to_angle(nside, pixel, nest=True)
    ra, dec = hpgeom.boundaries(nside, pixel, step=4, nest=True)
    c0 = _unit(np.atleast_1d(ra0), np.atleast_1d(dec0))[0]
    cos = np.clip(_unit(ra.ravel(), dec.ravel()) @ c0, -1.0, 1.0)
    radius = float(np.degrees(np.arccos(cos.min())))
    return Circle(float(ra0), float(dec0), min(radius * 1.01 + pad_deg, 179.0))


def _unit(ra, dec) -> np.ndarray:
    ra_r, dec_r = np.radians(ra), np.radians(dec)
    return np.stack(
        [np.cos(dec_r) * np.cos(ra_r), np.cos(dec_r) * np.sin(ra_r), np.sin(dec_r)], axis=1
    )


def _pixels(ra: np.ndarray, dec: np.ndarray, order: int) -> np.ndarray:
    return hpgeom.angle_to_pixel(hpgeom.order_to_nside(order), ra, dec, nest=True)


def _remap(values: np.ndarray, target: dict[int, int]) -> np.ndarray:
    return np.array([target.get(int(v), int(v)) for v in values], dtype=np.int64)


def reassign_forced(forced: pd.DataFrame, target: dict[int, int]) -> tuple[pd.DataFrame, int, int]:
    """Forced photometry of a group as the APDB stores it after the merge.

    Rows move to the survivor (``target``: merged-away ID → survivor); of the
    rows of one (survivor, visit, detector) the survivor's own is kept, else the
    one with the smallest ``diaForcedSourceId`` (the rule of
    :meth:`apdb.Apdb.merge_objects`).

    Returns
    -------
    (pandas.DataFrame, int, int)
        The rows kept; how many rows of merged-away objects move, how many are dropped.
    """
    if len(forced) == 0:
        return forced, 0, 0
    old = forced["diaObjectId"].to_numpy(dtype=np.int64)
    moved = np.isin(old, np.fromiter(target, dtype=np.int64))
    out = forced.assign(diaObjectId=_remap(old, target), _moved=moved)
    out = out.sort_values(["_moved", "diaForcedSourceId"], kind="stable")
    out = out.drop_duplicates(["diaObjectId", "visit", "detector"], keep="first")
    n_moved = int(out["_moved"].sum())
    return out.drop(columns="_moved").reset_index(drop=True), n_moved, int(moved.sum()) - n_moved


def _window(frame: pd.DataFrame, start: dict[int, float]) -> pd.DataFrame:
    """Rows whose ``midpointMjdTai`` is at or after their object's window start."""
    if len(frame) == 0:
        return frame
    ids = frame["diaObjectId"].to_numpy(dtype=np.int64)
    since = np.array([start.get(int(i), -np.inf) for i in ids])
    return frame[frame["midpointMjdTai"].to_numpy(dtype=np.float64) >= since]


def _summaries(
    apdb: Apdb,
    objects: pd.DataFrame,
    sources: pd.DataFrame,
    forced: pd.DataFrame | None,
    survivors: np.ndarray,
    summary: SummaryConfig,
    time_mjd: float,
) -> pd.DataFrame:
    """New versions of ``survivors`` from their (reassigned) sources in the history window."""
    mine = sources[np.isin(sources["diaObjectId"].to_numpy(dtype=np.int64), survivors)]
    last = mine.groupby(mine["diaObjectId"].to_numpy(dtype=np.int64))["midpointMjdTai"].max()
    start = {int(i): apdb.history_start(float(t)) for i, t in last.items()}
    mine = _window(mine, start).reset_index(drop=True)
    fs = None
    if forced is not None:
        fs = _window(
            forced[np.isin(forced["diaObjectId"].to_numpy(dtype=np.int64), survivors)], start
        ).reset_index(drop=True)
    prior = objects[np.isin(objects["diaObjectId"].to_numpy(dtype=np.int64), survivors)]
    return summarise(
        prior.reset_index(drop=True),
        sdm.empty_frame("DiaSource"),
        mine.assign(diaObjectId=pd.array(mine["diaObjectId"].to_numpy(np.int64), dtype="Int64")),
        summary,
        time_mjd=time_mjd,
        forced_sources=fs,
    )


def dedup_region(
    apdb: Apdb,
    pixel: int,
    dedup: DedupConfig,
    summary: SummaryConfig,
    *,
    time_mjd: float,
    dry_run: bool = False,
) -> RegionResult:
    """Find and merge the split DiaObjects whose survivor lies in one HEALPix pixel.

    Parameters
    ----------
    apdb : apdb.Apdb
        The database (written unless ``dry_run``).
    pixel : int
        HEALPix nest pixel of order ``dedup.region_order``.
    dedup, summary : DedupConfig, SummaryConfig
        Grouping settings; summary statistics (the pipeline's).
    time_mjd : float
        Validity end of the merged versions and start of the survivors' new ones.
    dry_run : bool
        Compute and count, write nothing.

    Returns
    -------
    RegionResult
        Counts, and ``merges`` (``diaObjectId``, ``survivorId``, ``separationArcsec``
        of the first grouping pass, survivors of later passes followed through).
    """
    order = dedup.region_order
    pad = (dedup.max_passes + 1) * dedup.max_distance_arcsec / 3600.0
    objects = apdb.get_objects(region_circle(pixel, order, pad)).reset_index(drop=True)
    result = RegionResult(pixel=int(pixel), n_objects=len(objects))
    if len(objects) < 2:
        return result
    expected = objects[["diaObjectId", "validityStartMjdTai"]].copy()
    kept_cols = ["diaObjectId", "ra", "dec", "raErr", "decErr", "firstDiaSourceMjdTai"]
    current = objects[kept_cols].copy()
    sources = sdm.empty_frame("DiaSource")
    origin = np.empty(0, dtype=np.int64)  # diaObjectId of each row of sources as stored
    loaded: set[int] = set()
    target: dict[int, int] = {}  # merged-away ID -> survivor
    first_pass: pd.DataFrame | None = None
    for _ in range(dedup.max_passes):
        need = _candidates(current, dedup) - loaded
        if need:
            more = apdb.get_sources(sorted(need), None)
            origin = np.concatenate([origin, more["diaObjectId"].to_numpy(dtype=np.int64)])
            sources = pd.concat([sources, more], ignore_index=True) if len(sources) else more
            loaded |= need
        groups = find_groups(current, sources, dedup)
        if len(groups) == 0:
            break
        surv = current.set_index("diaObjectId").loc[groups["survivorId"].to_numpy()]
        owned = _pixels(surv["ra"].to_numpy(), surv["dec"].to_numpy(), order) == pixel
        groups = groups[owned].reset_index(drop=True)
        if len(groups) == 0:
            break
        if first_pass is None:
            first_pass = groups
        step = dict(zip(groups["diaObjectId"].tolist(), groups["survivorId"].tolist(), strict=True))
        target = {k: step.get(v, v) for k, v in target.items()} | step
        sources = sources.assign(
            diaObjectId=pd.array(
                _remap(sources["diaObjectId"].to_numpy(dtype=np.int64), step), dtype="Int64"
            )
        )
        kept = np.unique(groups["survivorId"].to_numpy())
        new = _summaries(apdb, objects, sources, None, kept, summary, time_mjd)
        current = current[~current["diaObjectId"].isin(list(step))].set_index("diaObjectId")
        pos = new.set_index("diaObjectId")[kept_cols[1:]]
        current.loc[pos.index, kept_cols[1:]] = pos
        current = current.reset_index()
    if not target:
        return result

    merges = pd.DataFrame(
        {"diaObjectId": list(target), "survivorId": list(target.values())}, dtype=np.int64
    ).sort_values(["survivorId", "diaObjectId"], ignore_index=True)
    kept = np.unique(merges["survivorId"].to_numpy())
    involved = np.concatenate([kept, merges["diaObjectId"].to_numpy()])
    forced, n_forced, n_dropped = reassign_forced(apdb.get_forced_sources(involved, None), target)
    survivors = _summaries(apdb, objects, sources, forced, kept, summary, time_mjd)
    predicted = RegionResult(
        pixel=int(pixel),
        n_objects=len(objects),
        groups=int(kept.size),
        objects_merged=len(merges),
        sources_reassigned=int(np.isin(origin, merges["diaObjectId"].to_numpy()).sum()),
        forced_reassigned=n_forced,
        forced_dropped=n_dropped,
        merges=_with_separation(merges, first_pass),
    )
    if dry_run:
        return predicted
    expected = expected[expected["diaObjectId"].isin(involved)].reset_index(drop=True)
    try:
        done = apdb.merge_objects(merges, survivors, time_mjd=time_mjd, expected=expected)
    except ApdbError as exc:
        if "nothing was merged" not in str(exc):
            raise
        return RegionResult(pixel=int(pixel), n_objects=len(objects), conflict=str(exc))
    return replace(
        predicted,
        groups=done.n_survivors,
        objects_merged=done.n_merged,
        sources_reassigned=done.n_sources,
        forced_reassigned=done.n_forced_sources,
        forced_dropped=done.n_forced_dropped,
    )


def _with_separation(merges: pd.DataFrame, first_pass: pd.DataFrame | None) -> pd.DataFrame:
    if first_pass is None:
        return merges.assign(separationArcsec=np.nan)
    sep = first_pass.set_index("diaObjectId")["separationArcsec"]
    return merges.assign(separationArcsec=sep.reindex(merges["diaObjectId"]).to_numpy())


def _candidates(current: pd.DataFrame, dedup: DedupConfig) -> set[int]:
    """IDs of the objects with another object within the distance (whose visits are needed)."""
    if len(current) < 2:
        return set()
    u = _unit(current["ra"].to_numpy(dtype=float), current["dec"].to_numpy(dtype=float))
    chord = 2.0 * np.sin(np.radians(dedup.max_distance_arcsec / 3600.0) / 2.0)
    pairs = cKDTree(u).query_pairs(chord, output_type="ndarray")
    ids = current["diaObjectId"].to_numpy(dtype=np.int64)
    return {int(i) for i in np.unique(ids[pairs.ravel()])}


def _open_apdb(config: ApdbConfig) -> Apdb:
    """The APDB to de-duplicate; never created: a URL that holds no APDB is an error.

    A SQLite file is first looked at read-only: opening it for writing switches
    it to WAL mode, which would change a file that is not an APDB.
    """
    url = config.sqlalchemy_url()
    path = url.database
    if url.get_backend_name() == "sqlite" and path not in (None, "", ":memory:"):
        if not os.path.exists(path):
            raise ApdbError(f"APDB {config.safe_url()}: no such SQLite file")
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)
            ) as conn:
                found = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'metadata'"
                ).fetchone()
        except sqlite3.DatabaseError as exc:
            raise ApdbError(f"APDB {config.safe_url()}: not a SQLite database: {exc}") from exc
        if found is None:
            raise ApdbError(
                f"APDB {config.safe_url()}: no APDB tables (no 'metadata' table); nothing "
                f"to de-duplicate"
            )
    return make_apdb(config.model_copy(update={"auto_create": False}))


@task(
    name="dedup-region",
    task_run_name="dedup-p{pixel}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=3,
    retry_delay_seconds=[1, 2, 4],
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_transient,
)
def dedup_region_task(
    apdb_config: ApdbConfig,
    pixel: int,
    dedup: DedupConfig,
    summary: SummaryConfig,
    time_mjd: float,
    dry_run: bool,
) -> RegionResult:
    """One region's de-duplication (one transaction), retried on a TransientError."""
    apdb = _region_apdb(apdb_config)
    return dedup_region(apdb, pixel, dedup, summary, time_mjd=time_mjd, dry_run=dry_run)


@functools.lru_cache(maxsize=4)
def _region_apdb(config: ApdbConfig) -> Apdb:
    """One APDB client per process for the region tasks (opened once, not per region)."""
    return _open_apdb(config)


def run_dedup(
    config: PipelineConfig,
    dedup: DedupConfig,
    *,
    time_mjd: float | None = None,
    dry_run: bool = False,
    region_fn=None,
) -> tuple[DedupResult, list[RegionResult]]:
    """Visit every occupied region in pixel order; the counts and per-region results.

    ``region_fn(pixel) -> RegionResult`` runs one region (default: in this
    process, without Prefect).
    """
    t0 = time.perf_counter()
    time_mjd = _now_mjd_tai() if time_mjd is None else float(time_mjd)
    with _open_apdb(config.apdb) as apdb:
        pixels = apdb.object_pixels(dedup.region_order)
        if region_fn is None:

            def region_fn(pixel: int) -> RegionResult:
                return dedup_region(
                    apdb, pixel, dedup, config.summary, time_mjd=time_mjd, dry_run=dry_run
                )

        regions = [region_fn(int(p)) for p in pixels]
    out = DedupResult(
        regions=len(regions),
        regions_merged=sum(1 for r in regions if r.objects_merged),
        conflicts=sum(1 for r in regions if r.conflict),
        **{k: sum(getattr(r, k) for r in regions) for k in COUNTS},
        dry_run=bool(dry_run),
        time_mjd=time_mjd,
        wall_s=round(time.perf_counter() - t0, 3),
    )
    return out, regions


@flow(name="dedup-diaobjects", log_prints=True)
def process_dedup(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - frozen pydantic model
    dedup: DedupConfig = DedupConfig(),  # noqa: B008 - frozen pydantic model
    time_mjd: float | None = None,
    dry_run: bool = False,
) -> DedupResult:
    """Merge the DiaObjects split by alert production (see the module docstring).

    Parameters
    ----------
    config : PipelineConfig
        ``config.apdb`` names the APDB (never created here); ``config.summary``
        is the pipeline's summary configuration, used for the survivors.
    dedup : DedupConfig
        Merge distance, region size, passes.
    time_mjd : float, optional
        Validity time of the change (MJD TAI); default now.
    dry_run : bool
        Count what would be merged, write nothing.

    Returns
    -------
    DedupResult
        The counts, also published as the ``dedup-summary`` artifact.
    """
    logger = get_run_logger()
    time_mjd = _now_mjd_tai() if time_mjd is None else float(time_mjd)

    def region_fn(pixel: int) -> RegionResult:
        return dedup_region_task(config.apdb, pixel, dedup, config.summary, time_mjd, dry_run)

    result, regions = run_dedup(
        config, dedup, time_mjd=time_mjd, dry_run=dry_run, region_fn=region_fn
    )
    for r in regions:
        if r.conflict:
            logger.warning("region %d skipped: %s", r.pixel, r.conflict)
    logger.info("de-duplication of %s: %s", config.apdb.safe_url(), dict(result))
    _artifacts(result, regions, config.apdb.safe_url())
    return result


def _artifacts(result: DedupResult, regions: list[RegionResult], url: str) -> None:
    verb = "would merge" if result["dry_run"] else "merged"
    lines = [
        f"# DiaObject de-duplication of `{url}`" + (" (dry run)" if result["dry_run"] else ""),
        "",
        f"{result['regions']} region(s) visited, {result['regions_merged']} with merges, "
        f"{result['conflicts']} skipped on a conflict.",
        "",
        "| count | value |",
        "|---|---|",
        *(f"| {k} | {result[k]} |" for k in COUNTS),
        "",
        f"{verb} {result['objects_merged']} DiaObject(s) into {result['groups']} survivor(s).",
    ]
    create_markdown_artifact(key="dedup-summary", markdown="\n".join(lines))
    rows = [
        {k: v for k, v in asdict(r).items() if k != "merges"}
        for r in regions
        if r.objects_merged or r.conflict
    ]
    if rows:
        create_table_artifact(key="dedup-regions", table=rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.dedup",
        description="Merge DiaObjects split by alert production: pairs closer than "
        "--max-distance that agree within their position errors and never shared a visit, "
        "into the oldest ID, one transaction per sky region.",
    )
    p.add_argument("url", help="APDB URL (SQLite path or URL, PostgreSQL URL)")
    p.add_argument("--dry-run", action="store_true", help="count what would merge; write nothing")
    p.add_argument(
        "--max-distance",
        type=float,
        default=DedupConfig().max_distance_arcsec,
        help="merge distance (arcsec)",
    )
    p.add_argument(
        "--max-sigma",
        type=float,
        default=DedupConfig().max_sigma,
        help="merge only pairs whose separation is within this many standard deviations "
        "of their position errors",
    )
    p.add_argument(
        "--position-only",
        action="store_true",
        help="no --max-sigma test: merge on distance alone (as Rubin's ap_association)",
    )
    p.add_argument(
        "--region-order",
        type=int,
        default=DedupConfig().region_order,
        help="HEALPix order of the regions (one transaction each)",
    )
    p.add_argument("--time-mjd", type=float, help="validity time of the change (MJD TAI)")
    p.add_argument(
        "--no-prefect", action="store_true", help="run in this process, without a flow run"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; a bad URL or setting gives one ``error:`` line and status 2."""
    from pydantic import ValidationError

    from core.errors import ConfigError, one_line

    args = _parser().parse_args(argv)
    try:
        config = PipelineConfig.model_validate({"apdb": {"url": args.url}})
        dedup = DedupConfig(
            max_distance_arcsec=args.max_distance,
            max_sigma=None if args.position_only else args.max_sigma,
            region_order=args.region_order,
        )
        if args.no_prefect:
            result, _ = run_dedup(config, dedup, time_mjd=args.time_mjd, dry_run=args.dry_run)
        else:
            result = process_dedup(config, dedup, args.time_mjd, args.dry_run)
    except (ValidationError, ConfigError, InputError, ApdbError) as exc:
        print(f"python -m flows.dedup: error: {one_line(exc)}", file=sys.stderr)
        return 2
    verb = "would merge" if result["dry_run"] else "merged"
    print(
        f"{config.apdb.safe_url()}: {result['regions']} region(s); {verb} "
        f"{result['objects_merged']} DiaObject(s) into {result['groups']} survivor(s), "
        f"{result['sources_reassigned']} DiaSource(s) reassigned, "
        f"{result['forced_reassigned']} forced source(s) reassigned and "
        f"{result['forced_dropped']} dropped; {result['conflicts']} conflict(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
