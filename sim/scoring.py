"""Score a simulated run against the simulator's ground truth.

The simulator writes, beside each detector's bundle, ``truth.parquet`` (one
row per ``diaSources.parquet`` row, same order: ``row, truthId`` (-1 for
bogus), ``kind``, true position and fluxes) and ``truth_objects.parquet``
(every true object on the detector that visit, with its true difference and
science fluxes). Because DiaSource IDs are deterministic
(``diaSourceId = pack(visit, detector, row)``, docs/design.md §3), every stored
DiaSource can be traced back to its truth row without any matching.

Definitions (all fractions in 0..1)
-----------------------------------
Each bogus detection counts as its own one-off true identity; moving
(solar-system) objects are never expected to associate (Rubin associates them
with SSObjects, not DiaObjects), so they are reported apart and left out of
completeness and false-new counts.

purity
    Fraction of DiaObjects (with ≥ 1 stored DiaSource) whose DiaSources all
    come from one true identity.
completeness
    Of the true non-moving objects with ≥ 2 detections (catalog rows), the
    fraction that end as exactly one DiaObject: their stored detections all
    sit in one DiaObject (detections the quality cut rejected belong to no
    DiaObject). ``completeness_all_detections`` also requires every
    detection to be stored, so it counts quality-cut losses (e.g. a first
    detection on a bad column) too.
false_new_fraction
    New DiaObjects created by a detection of a real, non-moving true object
    that already had a DiaObject (an association miss: a duplicate), over all
    new DiaObjects. ``bogus_new_fraction`` reports the new DiaObjects made by
    bogus detections that passed the quality cut (a reliability issue, not an
    association one).
pulls
    ``(flux − true)/σ`` of forced photometry against the true flux of the
    object in that visit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.bundle import detector_path
from core.ids import IdPacker

__all__ = [
    "load_truth",
    "pull_statistics",
    "score_association",
    "score_forced",
]


def load_truth(
    root: str, visits, detectors, id_packer: IdPacker, *, objects: bool = False
) -> pd.DataFrame:
    """Concatenate the truth tables of ``visits`` × ``detectors``.

    Parameters
    ----------
    root : str
        Bundle root written by :meth:`sim.survey.Survey.write_visit`.
    visits, detectors : iterable of int
        Which detector folders to read (missing folders are skipped): visits by
        their LSSTCam visit number, the folder name
        (:meth:`sim.config.SurveyConfig.visit_number`).
    id_packer : IdPacker
        The packer the pipeline ran with; adds ``diaSourceId`` to source truth.
    objects : bool
        Read ``truth_objects.parquet`` (per true object) instead of
        ``truth.parquet`` (per detection).

    Returns
    -------
    pandas.DataFrame
        The truth rows with ``visit`` and ``detector`` columns (and
        ``diaSourceId`` for detections).
    """
    import fsspec

    name = "truth_objects.parquet" if objects else "truth.parquet"
    frames = []
    fs, _, _ = fsspec.get_fs_token_paths(root)
    for v in visits:
        for d in detectors:
            path = f"{detector_path(root, v, d)}/{name}"
            if not fs.exists(path):
                continue
            with fs.open(path, "rb") as fh:
                df = pd.read_parquet(fh)
            df.insert(0, "visit", np.int64(v))
            df.insert(1, "detector", np.int64(d))
            if not objects:
                df["diaSourceId"] = id_packer.pack(v, d, df["row"].to_numpy())
            frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def _identity(truth: pd.DataFrame) -> np.ndarray:
    """truthId, with each bogus detection given its own negative identity."""
    tid = truth["truthId"].to_numpy(dtype=np.int64).copy()
    bogus = tid < 0
    tid[bogus] = -1 - np.arange(int(bogus.sum()), dtype=np.int64)
    return tid


def score_association(stored: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """Purity, completeness and false new objects of an association run.

    Parameters
    ----------
    stored : pandas.DataFrame
        Every stored DiaSource of the run: ``diaSourceId``, ``diaObjectId``,
        ``midpointMjdTai``. A DiaObject is *new* from the DiaSource with
        ``diaObjectId == diaSourceId``.
    truth : pandas.DataFrame
        :func:`load_truth` detections of the same visits and detectors:
        ``diaSourceId, truthId, kind``.

    Returns
    -------
    dict
        ``purity, completeness, completeness_all_detections, false_new_fraction,
        bogus_new_fraction`` and the counts behind them.
    """
    t = truth[["diaSourceId", "truthId", "kind"]].copy()
    t["identity"] = _identity(t)
    s = stored[["diaSourceId", "diaObjectId", "midpointMjdTai"]].merge(
        t, on="diaSourceId", how="left", validate="one_to_one"
    )
    if s["truthId"].isna().any():
        raise ValueError(
            f"{int(s['truthId'].isna().sum())} stored DiaSource(s) have no truth row "
            "(different ID packer or visits?)"
        )
    s["diaObjectId"] = s["diaObjectId"].astype(np.int64)

    # purity: one true identity per DiaObject
    n_ident = s.groupby("diaObjectId")["identity"].nunique()
    n_objects = int(n_ident.size)
    purity = float((n_ident == 1).mean()) if n_objects else float("nan")
    sizes = s.groupby("diaObjectId").size()
    multi = n_ident[sizes > 1]

    # completeness over real, non-moving true objects with >= 2 detections
    real = t[(t["truthId"] >= 0) & (t["kind"] != "moving")]
    det_counts = real.groupby("truthId").size()
    eligible = det_counts[det_counts >= 2].index
    real_stored = s[s["truthId"].isin(eligible)]
    n_stored = real_stored.groupby("truthId").size().reindex(eligible, fill_value=0)
    n_obj = real_stored.groupby("truthId")["diaObjectId"].nunique().reindex(eligible, fill_value=0)
    one_object = n_obj == 1
    complete = one_object & (n_stored == det_counts.reindex(eligible))
    n_eligible = int(len(eligible))

    # new objects and duplicates
    new = s[s["diaObjectId"] == s["diaSourceId"]].sort_values("midpointMjdTai", kind="stable")
    n_new = int(len(new))
    new_real = new[(new["truthId"] >= 0) & (new["kind"] != "moving")]
    duplicates = int(new_real.duplicated("truthId", keep="first").sum())
    n_bogus_new = int((new["truthId"] < 0).sum())
    n_moving_new = int((new["kind"] == "moving").sum())
    return {
        "purity": purity,
        "purity_multi_source": float((multi == 1).mean()) if multi.size else float("nan"),
        "completeness": float(one_object.mean()) if n_eligible else float("nan"),
        "completeness_all_detections": float(complete.mean()) if n_eligible else float("nan"),
        "false_new_fraction": duplicates / n_new if n_new else 0.0,
        "bogus_new_fraction": n_bogus_new / n_new if n_new else 0.0,
        "n_dia_objects": n_objects,
        "n_impure": int((n_ident > 1).sum()),
        "n_stored_sources": int(len(s)),
        "n_true_objects_2plus": n_eligible,
        "n_incomplete": int((~one_object).sum()),
        "n_not_all_stored": int((one_object & ~complete).sum()),
        "n_split": int((n_obj > 1).sum()),
        "n_new": n_new,
        "n_false_new": duplicates,
        "n_bogus_new": n_bogus_new,
        "n_moving_new": n_moving_new,
    }


def pull_statistics(pulls: np.ndarray) -> dict:
    """Mean, standard deviation and robust width (1.4826·MAD) of finite pulls."""
    p = np.asarray(pulls, dtype=np.float64)
    p = p[np.isfinite(p)]
    if p.size == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "robust_std": float("nan")}
    med = np.median(p)
    return {
        "n": int(p.size),
        "mean": float(p.mean()),
        "std": float(p.std(ddof=1)) if p.size > 1 else float("nan"),
        "robust_std": float(1.4826 * np.median(np.abs(p - med))),
        "frac_beyond_5sigma": float((np.abs(p) > 5).mean()),
    }


def score_forced(
    forced: pd.DataFrame, truth_objects: pd.DataFrame, object_truth: pd.Series | None = None
) -> dict:
    """Forced-photometry pulls against the true fluxes, per true object kind.

    Parameters
    ----------
    forced : pandas.DataFrame
        DiaForcedSource rows: ``visit, detector, psfFlux, psfFluxErr,
        scienceFlux, scienceFluxErr`` and either ``truthId`` or
        ``diaObjectId`` (then ``object_truth`` maps it to ``truthId``).
    truth_objects : pandas.DataFrame
        :func:`load_truth` with ``objects=True``: ``visit, detector, truthId,
        kind, diffFlux, scienceFlux``.
    object_truth : pandas.Series, optional
        diaObjectId → truthId.

    Returns
    -------
    dict
        ``{kind: {"diff": pull statistics, "science": pull statistics}}`` for
        each kind present, plus ``"n_unmatched"`` forced rows without truth.
    """
    f = forced.copy()
    if "truthId" not in f.columns:
        if object_truth is None:
            raise ValueError("forced rows need truthId or an object_truth mapping")
        f["truthId"] = f["diaObjectId"].astype(np.int64).map(object_truth)
    f = f.dropna(subset=["truthId"])
    f["truthId"] = f["truthId"].astype(np.int64)
    truth = truth_objects[["visit", "detector", "truthId", "kind", "diffFlux", "scienceFlux"]]
    truth = truth.rename(columns={"diffFlux": "trueDiff", "scienceFlux": "trueScience"})
    m = f.merge(truth, on=["visit", "detector", "truthId"], how="inner")
    out: dict = {"n_unmatched": int(len(forced) - len(m))}
    for kind, grp in m.groupby("kind"):
        out[str(kind)] = {
            "diff": pull_statistics(
                (grp["psfFlux"].to_numpy(float) - grp["trueDiff"].to_numpy(float))
                / grp["psfFluxErr"].to_numpy(float)
            ),
            "science": pull_statistics(
                (grp["scienceFlux"].to_numpy(float) - grp["trueScience"].to_numpy(float))
                / grp["scienceFluxErr"].to_numpy(float)
            ),
        }
    return out
