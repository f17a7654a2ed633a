"""Eight detectors storing at once, in threads and in processes, on both backends."""

from __future__ import annotations

import multiprocessing
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

from apdb import make_apdb
from apdb.config import ApdbConfig
from tests.apdb.conftest import store_detector

WORKERS = 8
PER_DETECTOR = 200


def _store_one(url: str, detector: int, barrier=None):
    """One worker: its own connection, one detector of visit 1, 200 objects."""
    db = make_apdb(ApdbConfig(url=url, auto_create=False))
    try:
        ids = detector * 10_000 + np.arange(PER_DETECTOR)
        rng = np.random.default_rng(detector)
        ra = 100.0 + detector + rng.uniform(0, 0.1, PER_DETECTOR)
        dec = rng.uniform(-0.1, 0.1, PER_DETECTOR)
        if barrier is not None:
            barrier.wait(timeout=30)
        result = store_detector(db, 1, detector, ids, ra, dec, 60000.0)
        return result.already_stored, result.n_sources
    finally:
        db.close()


def _check(db):
    assert db.done_detectors(1) == set(range(WORKERS))
    counts = db.row_counts()
    assert counts["DiaSource"] == WORKERS * PER_DETECTOR
    assert counts["DiaForcedSource"] == WORKERS * PER_DETECTOR
    assert counts["DiaObjectLast"] == WORKERS * PER_DETECTOR
    assert counts["ApdbVisitDetector"] == WORKERS


def test_eight_threads_store_different_detectors(db, apdb_url):
    barrier = threading.Barrier(WORKERS)
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda d: _store_one(apdb_url, d, barrier), range(WORKERS)))
    assert results == [(False, PER_DETECTOR)] * WORKERS
    _check(db)


def test_eight_processes_store_different_detectors(db, apdb_url):
    # fork is fast; from Python 3.12 it warns in a multi-threaded process, so use forkserver there.
    ctx = multiprocessing.get_context("fork" if sys.version_info < (3, 12) else "forkserver")
    with ProcessPoolExecutor(WORKERS, mp_context=ctx) as pool:
        results = list(pool.map(_store_one, [apdb_url] * WORKERS, range(WORKERS)))
    assert results == [(False, PER_DETECTOR)] * WORKERS
    _check(db)


def test_eight_threads_store_the_same_detector_once(db, apdb_url):
    barrier = threading.Barrier(WORKERS)
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda _: _store_one(apdb_url, 3, barrier), range(WORKERS)))
    assert sorted(results) == [(False, PER_DETECTOR)] + [(True, 0)] * (WORKERS - 1)
    assert db.row_counts()["DiaSource"] == PER_DETECTOR
