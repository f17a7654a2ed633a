"""No NaN and no ±inf anywhere in an alert or in the APDB (undefined values are null).

Rubin writes null for an undefined float (e.g. ``{b}_psfFluxMeanErr`` of a band
with no data); a NaN or an infinity in a packet breaks brokers that parse it
as JSON or compute with it. Checked over every alert of a small simulated
survey (3 visits × 4 detectors, run through the real stages), and in every
float column of its APDB.
"""

from __future__ import annotations

import glob
import math
import sqlite3

import hypothesis  # noqa: F401  (see below)
import numpy as np
import pandas as pd
import pytest

from alerts.packet import PackagingConfig, encode_table, package_alerts
from alerts.store import read_alert_file
from apdb import sdm
from core.errors import AlertError
from flows.visit import run_visit_plain
from tests.alerts.conftest import make_alert_inputs
from tests.conftest import V0, V1, V2, make_config

# hypothesis is imported at collection, as by the other test modules: imported
# later (pytest's summary does it), trio's hypothesis hook warns under
# filterwarnings=error and fails a run of this file alone.


def _non_finite(value, path: str, out: list[str]) -> None:
    """Collect the paths of every non-finite float inside a decoded alert."""
    if isinstance(value, float):
        if not math.isfinite(value):
            out.append(f"{path} = {value}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _non_finite(v, f"{path}.{k}", out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _non_finite(v, f"{path}[{i}]", out)


@pytest.fixture(scope="module")
def survey_run(survey_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finite")
    config = make_config(tmp)
    for visit in (V0, V1, V2):
        result = run_visit_plain(survey_root, visit, config)
        assert not result["failed"], result["failed"]
    return tmp


def test_no_non_finite_number_in_any_alert(survey_run):
    files = sorted(glob.glob(str(survey_run / "alerts" / "*.avro")))
    assert len(files) == 12, "3 visits x 4 detectors"
    bad: list[str] = []
    n_alerts = n_null_err = n_sso = 0
    for f in files:
        for alert in read_alert_file(f):
            n_alerts += 1
            _non_finite(alert, str(alert["diaSourceId"]), bad)
            obj = alert["diaObject"]
            if obj is None:  # a known asteroid's alert: ssSource and mpc_orbits, checked above
                n_sso += alert["ssSource"] is not None
                continue
            # bands without data: the mean error is null (it was +inf)
            n_null_err += sum(
                obj[f"{b}_psfFluxMeanErr"] is None and obj[f"{b}_psfFluxNdata"] == 0
                for b in "ugrizy"
            )
    assert n_alerts > 100 and n_sso > 0
    assert n_null_err > 0, "some bands have no data, so null mean errors are exercised"
    assert not bad, f"{len(bad)} non-finite values, e.g. {bad[:5]}"


def test_no_nan_or_inf_in_the_apdb(survey_run):
    with sqlite3.connect(survey_run / "apdb.sqlite3") as conn:
        for table in ("DiaObject", "DiaSource", "DiaForcedSource", "SSSource"):
            floats = [c.name for c in sdm.columns(table) if c.dtype in ("float64", "float32")]
            df = pd.read_sql_query(
                f'SELECT {", ".join(f"{chr(34)}{c}{chr(34)}" for c in floats)} FROM "{table}"', conn
            )
            assert len(df), table
            values = df.to_numpy(dtype=np.float64, na_value=np.nan)
            inf = np.isinf(values).any(axis=0)
            assert not inf.any(), f"{table}: ±inf stored in {list(df.columns[inf])}"
            # SQLite stores NaN as NULL: what comes back as NaN was NULL in the table
            nulls = conn.execute(
                f'SELECT COUNT(*) FROM "{table}" WHERE "{floats[0]}" IS NULL'
            ).fetchone()[0]
            assert nulls == int(np.isnan(values[:, 0]).sum())


def _layout(fields):
    from alerts.packet import RecordLayout

    return RecordLayout("test", tuple(fields))


@pytest.mark.parametrize(
    ("value", "kind"),
    [(np.nan, "double"), (np.inf, "double"), (-np.inf, "float"), (1e39, "float")],
    ids=["nan", "inf", "minus-inf", "beyond-float32"],
)
def test_undefined_float_is_null_in_a_nullable_field(value, kind):
    frame = pd.DataFrame({"a": np.array([1.5, value])})
    buf, off = encode_table(frame, _layout([("a", kind, True)]))
    width = 5 if kind == "float" else 9
    assert buf[off[0] : off[1]][:1] == b"\x02" and off[1] - off[0] == width
    assert buf[off[1] : off[2]] == b"\x00", "the second row is null"


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_undefined_float_in_a_required_field_is_an_error(value):
    frame = pd.DataFrame({"ra": np.array([1.0, value])})
    with pytest.raises(AlertError, match="test.ra: .* at row 1 .*not nullable"):
        encode_table(frame, _layout([("ra", "double", False)]))


def test_packet_with_infinite_values_carries_null():
    """An infinity reaching the packager (DiaObject and DiaSource fields) is written as null."""
    bundle, new, objects, hist, forced = make_alert_inputs(n_alerts=5)
    objects = objects.copy()
    objects["g_psfFluxMeanErr"] = np.inf
    new = new.copy()
    new["apFlux"] = -np.inf
    batch = package_alerts(new, objects, hist, forced, {}, bundle.visit, PackagingConfig())
    bad: list[str] = []
    for alert in batch.records():
        _non_finite(alert, str(alert["diaSourceId"]), bad)
        assert alert["diaSource"]["apFlux"] is None
        if alert["diaObject"] is not None:
            assert alert["diaObject"]["g_psfFluxMeanErr"] is None
    assert not bad
