"""An APDB with injected splits and ground truth, for the de-duplication tests.

True objects sit at random in a 0.3° cone; each is detected in a random subset
of 24 visits (one detector; each visit with probability ``p_detect``, and at
least two). A third of them are split, as alert production
splits an object: their detections are shared between two or three DiaObject
IDs, never two of one visit. Each detection scatters about the true position by
its object's astrometric error (0.05–0.4″ per axis, quoted in raErr/decErr). One in ten has a distinct true
neighbour 0.3–1.4″ away detected in the same visits: a close pair that shared
visits, which must never merge. Every DiaObject has forced photometry in every
visit from its first detection on, so the pieces of a split overlap there (a tenth of those measurements missing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from apdb import sdm
from tasks.summarise import SummaryConfig, summarise
from tests.apdb.conftest import make_forced, make_sources

N_VISITS = 24
FIRST_VISIT = 5000
MJD0 = 61000.0
RA0, DEC0, FIELD_DEG = 150.0, 2.0, 0.3
BANDS = ("g", "r", "i")


@dataclass(frozen=True)
class Case:
    objects: pd.DataFrame
    sources: pd.DataFrame
    forced: pd.DataFrame
    truth: pd.Series  # diaObjectId -> true object index
    first: pd.Series  # diaObjectId -> first detection MJD
    n_true: int
    n_split: int
    n_pairs: int

    def expected_merges(self) -> pd.DataFrame:
        """Each split piece and the oldest piece of its true object (the survivor)."""
        df = pd.DataFrame({"diaObjectId": self.truth.index, "true": self.truth.to_numpy()})
        df["first"] = self.first.reindex(df["diaObjectId"]).to_numpy()
        df = df.sort_values(["true", "first", "diaObjectId"])
        df["survivorId"] = df.groupby("true")["diaObjectId"].transform("first")
        return df[df["diaObjectId"] != df["survivorId"]][["diaObjectId", "survivorId"]]


def _offset(ra, dec, dra_arcsec, ddec_arcsec):
    return (
        ra + dra_arcsec / 3600.0 / np.cos(np.radians(dec)),
        dec + ddec_arcsec / 3600.0,
    )


def build(
    n_true: int = 1200, seed: int = 7, split_fraction: float = 1 / 3, p_detect: float = 0.7
) -> Case:
    rng = np.random.default_rng(seed)
    r = FIELD_DEG * np.sqrt(rng.uniform(0, 1, n_true))
    phi = rng.uniform(0, 2 * np.pi, n_true)
    ra = RA0 + r * np.cos(phi) / np.cos(np.radians(DEC0))
    dec = DEC0 + r * np.sin(phi)
    detected = rng.uniform(size=(n_true, N_VISITS)) < p_detect
    # close distinct neighbours, detected in the same visits as their primary
    n_pairs = n_true // 10
    prim = rng.choice(n_true, n_pairs, replace=False)
    sep = rng.uniform(0.3, 1.4, n_pairs)
    ang = rng.uniform(0, 2 * np.pi, n_pairs)
    pra, pdec = _offset(ra[prim], dec[prim], sep * np.cos(ang), sep * np.sin(ang))
    ra, dec = np.concatenate([ra, pra]), np.concatenate([dec, pdec])
    detected = np.concatenate([detected, detected[prim]])
    # everyone is seen at least twice, in visits of their own
    two = np.argsort(rng.uniform(size=detected.shape), axis=1)[:, :2]
    detected[np.arange(len(detected))[:, None], two] = True
    n_all = len(ra)
    flux = rng.uniform(500, 5000, n_all)
    sigma = rng.uniform(0.05, 0.4, n_all)  # per-axis astrometric error of a detection (″)
    # splits: pieces over the detections (never two pieces in one visit)
    split = np.zeros(n_all, dtype=int)
    eligible = np.setdiff1d(np.arange(n_true), prim)
    chosen = rng.choice(eligible, int(split_fraction * n_true), replace=False)
    split[chosen] = np.where(rng.uniform(size=chosen.size) < 0.15, 3, 2)

    ids = rng.permutation(np.unique(rng.integers(10**6, 10**9, 4 * n_all)))[: 3 * n_all]
    next_id = iter(ids.tolist())
    src_rows = []
    truth = {}
    next_src = 1
    for t in range(n_all):
        visits = np.flatnonzero(detected[t])
        pieces = min(max(split[t], 1), visits.size)
        if pieces == 1:
            label = np.zeros(visits.size, dtype=int)
        elif rng.uniform() < 0.5:  # a time split: later detections went to new objects
            cuts = np.sort(rng.choice(np.arange(1, visits.size), pieces - 1, replace=False))
            label = np.searchsorted(cuts, np.arange(visits.size), side="right")
        else:  # interleaved: each detection joined one piece or another
            label = rng.integers(0, pieces, visits.size)
            label[:pieces] = np.arange(pieces)
        piece_ids = [next(next_id) for _ in range(pieces)]
        for p, oid in enumerate(piece_ids):
            truth[oid] = t
            v = visits[label == p]
            n = v.size
            sra, sdec = _offset(
                np.full(n, ra[t]),
                np.full(n, dec[t]),
                rng.normal(0, sigma[t], n),
                rng.normal(0, sigma[t], n),
            )
            src_rows.append(
                pd.DataFrame(
                    {
                        "diaSourceId": np.arange(next_src, next_src + n),
                        "diaObjectId": oid,
                        "visit": FIRST_VISIT + v,
                        "midpointMjdTai": MJD0 + v,
                        "ra": sra,
                        "dec": sdec,
                        "err": np.full(n, sigma[t] / 3600.0),
                        "psfFlux": flux[t] + rng.normal(0, 50, n),
                        "band": [BANDS[k % 3] for k in v],
                    }
                )
            )
            next_src += n
    s = pd.concat(src_rows, ignore_index=True)
    sources = make_sources(
        s["diaSourceId"], s["diaObjectId"], s["ra"], s["dec"], visit=0, detector=0, mjd=0.0
    )
    sources = sources.assign(
        visit=s["visit"].to_numpy(np.int64),
        midpointMjdTai=s["midpointMjdTai"].to_numpy(),
        psfFlux=s["psfFlux"].to_numpy(np.float32),
        psfFluxErr=np.full(len(s), 50.0, np.float32),
        band=s["band"].to_numpy(object),
        raErr=s["err"].to_numpy(np.float32),
        decErr=s["err"].to_numpy(np.float32),
    )
    first = sources.groupby("diaObjectId")["midpointMjdTai"].min()
    first.index = first.index.astype(np.int64)

    # forced photometry of every piece in every visit from its first detection
    f_oid, f_visit = [], []
    for oid, t0 in first.items():
        v = np.arange(int(round(t0 - MJD0)), N_VISITS)
        f_oid.append(np.full(v.size, oid))
        f_visit.append(v)
    f_oid, f_visit = np.concatenate(f_oid), np.concatenate(f_visit)
    # a tenth of the forced measurements missing (off the detector, masked pixels), so
    # a merged-away piece sometimes has the only measurement of a visit
    keep = rng.uniform(size=f_oid.size) >= 0.1
    f_oid, f_visit = f_oid[keep], f_visit[keep]
    pos = sources.groupby("diaObjectId")[["ra", "dec"]].mean()
    nf = f_oid.size
    forced = make_forced(
        np.arange(1, nf + 1),
        f_oid,
        pos["ra"].reindex(f_oid).to_numpy(),
        pos["dec"].reindex(f_oid).to_numpy(),
        visit=0,
        detector=0,
        mjd=0.0,
    ).assign(
        visit=FIRST_VISIT + f_visit,
        midpointMjdTai=MJD0 + f_visit,
        psfFlux=(flux[pd.Series(truth).reindex(f_oid).to_numpy()] + rng.normal(0, 30, nf)).astype(
            np.float32
        ),
        psfFluxErr=np.full(nf, 30.0, np.float32),
        band=[BANDS[k % 3] for k in f_visit],
    )
    objects = object_versions(sources, forced)
    return Case(
        objects=objects,
        sources=sources,
        forced=forced,
        truth=pd.Series(truth, dtype=np.int64),
        first=first,
        n_true=n_all,
        n_split=int((split > 1).sum()),
        n_pairs=n_pairs,
    )


def object_versions(sources: pd.DataFrame, forced: pd.DataFrame) -> pd.DataFrame:
    """The DiaObjects the pipeline would hold: summaries, valid from their last detection."""
    objects = summarise(
        sdm.empty_frame("DiaObject"),
        sdm.empty_frame("DiaSource"),
        sources,
        SummaryConfig(),
        time_mjd=0.0,
        forced_sources=forced,
    )
    return objects.assign(validityStartMjdTai=objects["lastDiaSourceMjdTai"].to_numpy())
