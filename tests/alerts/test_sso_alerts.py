"""Solar-system alerts: ssSource and mpc_orbits filled, no DiaObject, no history — as Rubin's."""

from __future__ import annotations

import fastavro
import numpy as np
import pandas as pd
import pytest
from lsst.alert.packet import Schema, get_schema_path

from alerts.packet import PackagingConfig, clean_alert_record, decode_alert, package_alerts
from tasks.ssoassociate import associate_solar_system
from tests.data import RUBIN_ALERTS

from .conftest import make_alert_inputs

N_SSO = 3


def _ephemerides(src: pd.DataFrame) -> pd.DataFrame:
    """Predictions 0.1″ north of the given sources, with geometry and orbit columns."""
    n = len(src)
    return pd.DataFrame(
        {
            "ssObjectId": np.arange(n, dtype=np.int64) + 21163624394469969,
            "designation": [f"2004 JQ{12 + k}" for k in range(n)],
            "ephRa": src["ra"].to_numpy(),
            "ephDec": src["dec"].to_numpy() + 0.1 / 3600,
            "ephRaErr": np.full(n, 0.05, np.float32),
            "ephDecErr": np.full(n, 0.05, np.float32),
            "ephRate": np.full(n, 0.21, np.float32),
            "ephRateRa": np.full(n, -0.2, np.float32),
            "ephRateDec": np.full(n, 0.064, np.float32),
            "ephVmag": np.full(n, 20.5, np.float32),
            "elongation": np.full(n, 164.0, np.float32),
            "phaseAngle": np.full(n, 4.6, np.float32),
            "topoRange": np.full(n, 1.64, np.float32),
            "topoRangeRate": np.full(n, -2.0, np.float32),
            "helioRange": np.full(n, 2.29, np.float32),
            "helioRangeRate": np.full(n, -0.4, np.float32),
            **{f"helio_{c}": np.full(n, 1.0, np.float32) for c in ("x", "y", "z")},
            **{f"topo_{c}": np.full(n, 0.5, np.float32) for c in ("x", "y", "z")},
            **{
                f"{f}_{c}": np.full(n, 10.0, np.float32)
                for f in ("helio", "topo")
                for c in ("vx", "vy", "vz", "vtot")
            },
            "packed_primary_provisional_designation": [f"K04J{12 + k}Q" for k in range(n)],
            "unpacked_primary_provisional_designation": [f"2004 JQ{12 + k}" for k in range(n)],
            "a": np.full(n, 2.763),
            "q": np.full(n, 1.951),
            "e": np.full(n, 0.294),
            "i": np.full(n, 7.53),
            "node": np.full(n, 205.17),
            "argperi": np.full(n, 103.29),
            "mean_anomaly": np.full(n, 202.69),
            "epoch_mjd": np.full(n, 61000.0),
            "h": np.full(n, 16.45),
            "g": np.full(n, 0.15),
        }
    )


@pytest.fixture(scope="module")
def sso_batch():
    bundle, new, objects, hist, forced = make_alert_inputs(seed=5, n_alerts=12, depth=4, forced=4)
    new = new.copy()
    sso = np.arange(N_SSO)
    ny, nx = bundle.difference.image.shape
    res = associate_solar_system(
        new.iloc[sso], _ephemerides(new.iloc[sso]), bundle.difference.wcs, (ny, nx)
    )
    assert res.n_associated == N_SSO
    new.loc[new.index[sso], "diaObjectId"] = 0
    new.loc[new.index[sso], "ssObjectId"] = res.sso_sources["ssObjectId"].to_numpy()
    # an earlier solar-system DiaSource (diaObjectId 0) must not become anyone's history
    old = new.iloc[[N_SSO]].copy()
    old["diaSourceId"] = 1
    old["diaObjectId"] = 0
    old["midpointMjdTai"] = bundle.visit.midpointMjdTai - 3.0
    hist = pd.concat([hist, old], ignore_index=True)
    batch = package_alerts(
        new,
        objects,
        hist,
        forced,
        {},
        bundle.visit,
        PackagingConfig(schema_version="10.0"),
        ss_sources=res.ss_sources,
        orbits=res.orbits,
    )
    return batch, res


def _real_sso_alerts():
    with open(RUBIN_ALERTS, "rb") as f:
        recs = [clean_alert_record(r) for r in fastavro.reader(f)]
    return [r for r in recs if r["diaSource"]["diaObjectId"] == 0 and r["diaSource"]["ssObjectId"]]


def test_sso_alerts_validate_and_carry_the_association(sso_batch):
    batch, res = sso_batch
    official = Schema.from_file(f"{get_schema_path(10, 0)}/lsst.v10_0.alert.avsc")
    recs = [decode_alert(p, batch.schema) for p in batch.payloads]
    for rec in recs:
        assert official.validate(rec)
    for k, rec in enumerate(recs[:N_SSO]):
        ss, orb = rec["ssSource"], rec["mpc_orbits"]
        assert ss["diaSourceId"] == rec["diaSourceId"] == res.ss_sources["diaSourceId"].iloc[k]
        assert ss["ssObjectId"] == rec["diaSource"]["ssObjectId"] == 21163624394469969 + k
        assert ss["ephOffset"] == pytest.approx(0.1, abs=1e-3)
        assert orb["designation"] == ss["designation"] == f"2004 JQ{12 + k}"
        assert orb["a"] == pytest.approx(2.763) and orb["id"] == 0
        assert rec["diaObject"] is None
        assert rec["prvDiaSources"] is None and rec["prvDiaForcedSources"] is None
    for rec in recs[N_SSO:]:
        assert rec["ssSource"] is None and rec["mpc_orbits"] is None


def test_sso_alert_nulls_match_rubins(sso_batch):
    batch, _ = sso_batch
    real = _real_sso_alerts()
    assert len(real) == 2
    ours = clean_alert_record(decode_alert(batch.payloads[0], batch.schema))
    for r in real:
        top = {k for k, v in r.items() if v is None}
        assert {k for k, v in ours.items() if v is None} - {
            "cutoutDifference",
            "cutoutScience",
            "cutoutTemplate",
        } == top
        # every ssSource field Rubin fills, we fill
        rubin_set = {k for k, v in r["ssSource"].items() if v is not None}
        ours_set = {k for k, v in ours["ssSource"].items() if v is not None}
        assert rubin_set <= ours_set
        # and the orbit's identity and elements
        for f in (
            "designation",
            "packed_primary_provisional_designation",
            "a",
            "e",
            "i",
            "node",
            "argperi",
            "mean_anomaly",
            "epoch_mjd",
            "h",
            "g",
            "q",
        ):
            assert r["mpc_orbits"][f] is not None and ours["mpc_orbits"][f] is not None
