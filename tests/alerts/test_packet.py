"""Alert packets: official schema, history rules, nulls, real Rubin packets round-trip."""

from __future__ import annotations

import io

import fastavro
import numpy as np
import pandas as pd
import pytest
from lsst.alert.packet import Schema, get_schema_path

from alerts.cutouts import make_cutouts
from alerts.packet import (
    PackagingConfig,
    clean_alert_record,
    decode_alert,
    encode_alert_records,
    load_schema,
    package_alerts,
    wire_header,
)
from core.bundle import VisitInfo
from core.errors import AlertError, ConfigError
from tests.data import RUBIN_ALERTS

from .conftest import make_alert_inputs

REAL = str(RUBIN_ALERTS)
VERSIONS = ["10.0", "11.0", "11.1"]


@pytest.fixture(scope="module")
def sim():
    bundle, new, objects, hist, forced = make_alert_inputs(seed=3, n_alerts=40, depth=12, forced=8)
    cutouts = make_cutouts(new, bundle)
    return bundle, new, objects, hist, forced, cutouts


@pytest.fixture(scope="module")
def real():
    with open(REAL, "rb") as f:
        return list(fastavro.reader(f))


def _fastavro_bytes(record, schema) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema.parsed, record)
    return out.getvalue()


def test_default_schema_is_latest_and_wire_header():
    schema = load_schema(PackagingConfig().schema_version)
    assert schema.version == "11.1"
    assert schema.schema_id == 1101
    assert wire_header(1101) == b"\x00\x00\x00\x04\x4d"


@pytest.mark.parametrize("version", VERSIONS)
def test_every_packet_of_a_simulated_visit_validates(sim, version):
    bundle, new, objects, hist, forced, cutouts = sim
    batch = package_alerts(
        new, objects, hist, forced, cutouts, bundle.visit, PackagingConfig(schema_version=version)
    )
    official = _official(version)
    assert len(batch) == len(new)
    assert batch.dia_source_ids.tolist() == new["diaSourceId"].tolist()
    for payload in batch.payloads:
        record = decode_alert(payload, batch.schema)
        assert official.validate(record)
        # byte-identical to what fastavro writes for the same record
        assert _fastavro_bytes(record, batch.schema) == payload


def test_history_window_exclusion_and_forced_threshold(sim):
    bundle, new, objects, hist, forced, cutouts = sim
    hist = pd.concat([hist, new.iloc[[0]]])  # the new source itself must not reappear
    config = PackagingConfig(forced_source_history_threshold=5)
    records = package_alerts(new, objects, hist, forced, cutouts, bundle.visit, config).records()
    start = bundle.visit.midpointMjdTai - 360.0
    n_dia = dict(zip(objects.diaObjectId, objects.nDiaSources, strict=True))
    for (_, src), rec in zip(new.iterrows(), records, strict=True):
        oid = src.diaObjectId
        if pd.isna(oid):
            assert rec["diaObject"] is None
            assert rec["prvDiaSources"] is None and rec["prvDiaForcedSources"] is None
            continue
        assert rec["diaObject"]["diaObjectId"] == oid
        want = hist[(hist.diaObjectId == oid) & (hist.midpointMjdTai >= start)]
        want = want[want.diaSourceId != src.diaSourceId]
        got = rec["prvDiaSources"]
        if len(want) == 0:
            assert got is None
        else:
            assert sorted(r["diaSourceId"] for r in got) == sorted(want.diaSourceId)
            mjd = [r["midpointMjdTai"] for r in got]
            assert mjd == sorted(mjd)
        fwant = forced[(forced.diaObjectId == oid) & (forced.midpointMjdTai >= start)]
        if n_dia[oid] >= 5 and len(fwant):
            assert sorted(r["diaForcedSourceId"] for r in rec["prvDiaForcedSources"]) == sorted(
                fwant.diaForcedSourceId
            )
        else:
            assert rec["prvDiaForcedSources"] is None


def test_nulls_are_avro_null(sim):
    bundle, new, objects, hist, forced, cutouts = sim
    rec = package_alerts(new, objects, hist, forced, cutouts, bundle.visit).records()
    for (_, src), r in zip(new.iterrows(), rec, strict=True):
        ds = r["diaSource"]
        assert (ds["xErr"] is None) == bool(np.isnan(src.xErr))
        assert (ds["reliability"] is None) == bool(np.isnan(src.reliability))
        assert (ds["isDipole"] is None) == bool(pd.isna(src.isDipole))
        assert (ds["diaObjectId"] is None) == bool(pd.isna(src.diaObjectId))
        assert ds["ssObjectId"] is None and ds["trailFlux"] is None  # absent → null
        assert r["ssSource"] is None and r["mpc_orbits"] is None
        assert r["observation_reason"] == "wfd" and r["target_name"] == "field_1"
        assert r["cutoutDifference"] == cutouts[src.diaSourceId][0]


def test_missing_stamps_and_objects_are_null(sim):
    bundle, new, objects, hist, forced, _ = sim
    batch = package_alerts(new.iloc[:3], objects.iloc[1:], hist, forced, {}, bundle.visit)
    recs = batch.records()
    assert [r["cutoutScience"] for r in recs] == [None, None, None]
    assert recs[0]["diaObject"] is None and recs[1]["diaObject"] is not None
    assert batch.n_without_cutouts == 3 and batch.n_without_object == 1


def test_null_in_non_nullable_field_names_it(sim):
    bundle, new, objects, hist, forced, cutouts = sim
    bad = new.copy()
    bad["psfNdata"] = bad["psfNdata"].astype("Int32")
    bad.loc[bad.index[2], "psfNdata"] = pd.NA
    with pytest.raises(AlertError, match=r"diaSource\.psfNdata: null at row 2"):
        package_alerts(bad, objects, hist, forced, cutouts, bundle.visit)


def test_empty_input_switch_off_and_unknown_version(sim):
    bundle, new, objects, hist, forced, cutouts = sim
    empty = package_alerts(new.iloc[:0], objects, hist, forced, cutouts, bundle.visit)
    assert len(empty) == 0 and empty.dia_source_ids.dtype == np.int64
    off = package_alerts(
        new, objects, hist, forced, cutouts, bundle.visit, PackagingConfig(do_package=False)
    )
    assert len(off) == 0
    with pytest.raises(ConfigError, match="no alert schema 99.7"):
        load_schema("99.7")
    with pytest.raises(ValueError, match="no alert schema 99.7"):
        PackagingConfig(schema_version="99.7")


def test_inputs_not_modified(sim):
    bundle, new, objects, hist, forced, cutouts = sim
    copies = [df.copy() for df in (new, objects, hist, forced)]
    package_alerts(new, objects, hist, forced, cutouts, bundle.visit)
    for a, b in zip((new, objects, hist, forced), copies, strict=True):
        pd.testing.assert_frame_equal(a, b)


def _official(version: str) -> Schema:
    major, minor = map(int, version.split("."))
    return Schema.from_file(f"{get_schema_path(major, minor)}/lsst.v{major}_{minor}.alert.avsc")


@pytest.mark.parametrize("version", VERSIONS)
def test_real_rubin_packets_round_trip_through_writer(real, version):
    schema = load_schema(version)
    cleaned = [clean_alert_record(r, schema) for r in real]
    assert "lc_features" not in cleaned[0]
    assert sum(c["diaObject"] is None for c in cleaned) == 2  # Fink's all-null records
    payloads = encode_alert_records(cleaned, schema)
    for rec, payload in zip(cleaned, payloads, strict=True):
        assert payload == _fastavro_bytes(rec, schema)
        assert decode_alert(payload, schema) == rec


@pytest.mark.slow
def test_real_rubin_packets_validate_against_official_schema(real):
    """fastavro's validator takes ~1 s per long-history alert."""
    official = _official("11.1")
    schema = load_schema("11.1")
    for rec in real:
        assert official.validate(
            decode_alert(encode_alert_records([clean_alert_record(rec, schema)], schema)[0], schema)
        )


def _frame(rows, layout) -> pd.DataFrame:
    """SDM-like DataFrame with exact dtypes (nullable ints stay exact)."""
    cols = {}
    for name, kind, _ in layout.fields:
        vals = [r.get(name) for r in rows]
        if kind in ("long", "int"):
            cols[name] = pd.array(vals, dtype="Int64")
        elif kind == "boolean":
            cols[name] = pd.array(vals, dtype="boolean")
        elif kind in ("float", "double"):
            cols[name] = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
        else:
            cols[name] = np.array(vals, dtype=object)
    return pd.DataFrame(cols)


def test_real_packets_rebuilt_from_tables_match(real):
    """diaSource/history/forced/diaObject tables of a real alert → the same alert."""
    schema = load_schema("10.0")
    for raw in real:
        rec = clean_alert_record(raw, schema)
        ds = rec["diaSource"]
        visit = VisitInfo(
            visit=ds["visit"],
            band=ds["band"],
            midpointMjdTai=ds["midpointMjdTai"],
            exposureTime=30.0,
            boresightRa=0.0,
            boresightDec=0.0,
            rotAngle=0.0,
            observation_reason=rec["observation_reason"],
            target_name=rec["target_name"],
            detectors=(ds["detector"],),
        )
        lay = schema.records
        objects = _frame([rec["diaObject"]] if rec["diaObject"] else [], lay["diaObject"])
        cutouts = {
            ds["diaSourceId"]: (
                rec["cutoutDifference"],
                rec["cutoutScience"],
                rec["cutoutTemplate"],
            )
        }
        config = PackagingConfig(
            schema_version="10.0", history_days=1e5, forced_source_history_threshold=0
        )
        batch = package_alerts(
            _frame([ds], lay["diaSource"]),
            objects,
            _frame(rec["prvDiaSources"] or [], lay["prvDiaSources"]),
            _frame(rec["prvDiaForcedSources"] or [], lay["prvDiaForcedSources"]),
            cutouts,
            visit,
            config,
        )
        got = batch.records()[0]
        for key in ("prvDiaSources", "prvDiaForcedSources"):
            for r in (got, rec):
                if r[key] is not None:
                    r[key] = sorted(r[key], key=lambda x: (x["midpointMjdTai"], str(x)))
        rec = {**rec, "ssSource": None, "mpc_orbits": None}  # diapipe does not send these
        assert got == rec
