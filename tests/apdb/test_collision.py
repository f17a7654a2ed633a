"""Given diaSourceIds that collide with stored ones: a clear error, nothing stored."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import InputError

from .conftest import make_objects, make_sources


@pytest.mark.parametrize("later_visit", [False, True], ids=["same-visit", "later-visit"])
def test_colliding_given_ids_name_the_ids_and_who_stored_them(db, later_visit):
    """Two detectors whose catalogs both number their sources 0..N-1 (new DiaObjects each)."""
    ids = np.arange(3, dtype=np.int64)
    ra = np.array([10.0, 10.001, 10.002])
    db.store(
        1,
        5,
        make_objects(ids, ra, 0.0 * ra),
        make_sources(ids, ids, ra, 0.0 * ra, visit=1, detector=5, mjd=60000.0),
        None,
        time_mjd=60000.0,
    )
    visit, mjd = (2, 60001.0) if later_visit else (1, 60000.0)
    before = db.row_counts()
    with pytest.raises(
        InputError,
        match=rf"store\({visit}, 6\): diaSourceId values collide with IDs already in the APDB "
        r".*: 3 of them, e.g. 0 \(visit 1, detector 5\); 1 \(visit 1, detector 5\)",
    ):
        db.store(
            visit,
            6,
            make_objects(ids, ra + 1, 0.0 * ra),
            make_sources(ids, ids, ra + 1, 0.0 * ra, visit=visit, detector=6, mjd=mjd),
            None,
            time_mjd=mjd,
        )
    assert db.row_counts() == before, "nothing of the second detector was stored"
