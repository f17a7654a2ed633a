"""The alert viewer: ``python -m alerts show`` on real Rubin packets and on diapipe's alerts."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from astropy.io import fits
from matplotlib.image import imread

from alerts.__main__ import main
from alerts.cutouts import make_cutouts
from alerts.packet import package_alerts
from alerts.store import AlertStoreConfig, write_alerts
from alerts.viewer import (
    is_solar_system,
    light_curve,
    load_alerts,
    normalize_alert,
    read_stamp,
    render_alert,
    select_alert,
    show_alert,
    solar_system_rows,
    summarize_alert,
)
from core.errors import InputError
from tests.data import RUBIN_ALERTS

from .conftest import make_alert_inputs

# the 7 real LSSTCam packets (tests/data)
REAL = str(RUBIN_ALERTS)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def real_alerts() -> list[dict]:
    return load_alerts(REAL)


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> str:
    """An alert file written by diapipe's packaging code: 12 alerts with stamps,
    histories of 0-4 DiaSources, 3 forced sources each, every 5th without DiaObject."""
    bundle, new, objects, hist, forced = make_alert_inputs(seed=5, n_alerts=12, depth=4, forced=3)
    cutouts = make_cutouts(new, bundle)
    batch = package_alerts(new, objects, hist, forced, cutouts, bundle.visit)
    out = tmp_path_factory.mktemp("viewer") / "alerts"
    return write_alerts(batch, AlertStoreConfig(location=str(out)))


def _check_png(path, rendered) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 20_000
    pixels = imread(path)
    assert pixels.shape[:2] == (rendered.size[1], rendered.size[0]) == (850, 1200)
    gray = pixels[..., :3].mean(axis=2)
    for name, (x0, y0, x1, y1) in rendered.stamp_boxes.items():
        panel = gray[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2]
        assert panel.size > 200 * 200, name
        assert panel.var() > 1e-3, f"{name} stamp panel is blank"
    return gray


def test_renders_all_seven_real_packets(real_alerts, tmp_path):
    assert len(real_alerts) == 7
    for k, alert in enumerate(real_alerts):
        path = str(tmp_path / f"{k}.png")
        rendered = render_alert(alert, path, source=REAL)
        _check_png(path, rendered)
        assert set(rendered.stamp_boxes) == {"difference", "science", "template"}
        if alert["diaObject"] is None and alert["diaSource"]["ssObjectId"]:
            # a solar-system alert shows the asteroid's identity and motion instead
            assert rendered.motion and rendered.n_points == {}
            continue
        assert not rendered.motion
        lc = light_curve(alert)
        assert rendered.n_points == {
            "source": int((lc["kind"] == "source").sum()),
            "forced": int((lc["kind"] == "forced").sum()),
            "current": 1,
        }


def test_real_solar_system_alerts_have_no_object(real_alerts):
    # Fink writes a null diaObject as a record of nulls; the viewer reads it as None.
    no_object = [a for a in real_alerts if a["diaObject"] is None]
    assert len(no_object) == 2
    text = summarize_alert(no_object[0])
    assert "diaObject            none" in text
    assert str(no_object[0]["diaSourceId"]) in text


def test_real_light_curve_counts_and_order(real_alerts):
    alert = real_alerts[0]
    lc = light_curve(alert)
    finite = [
        r for r in alert["prvDiaSources"] if r["psfFlux"] is not None and np.isfinite(r["psfFlux"])
    ]
    assert (lc["kind"] == "source").sum() == len(finite) == 345
    assert np.all(np.diff(lc["midpointMjdTai"].to_numpy()) >= 0)
    assert set(lc["band"]) == {"g", "r", "i", "z"}
    cur = lc[lc["kind"] == "current"].iloc[0]
    assert cur["psfFlux"] == pytest.approx(alert["diaSource"]["psfFlux"])
    assert cur["band"] == "i"


def test_renders_our_alerts(ours, tmp_path):
    alerts = load_alerts(ours)
    assert len(alerts) == 12
    assert any(a["diaObject"] is None for a in alerts)
    assert any(a["prvDiaSources"] for a in alerts)
    deepest = max(alerts, key=lambda a: len(a["prvDiaSources"] or []))
    no_object = next(a for a in alerts if a["diaObject"] is None)
    for alert in (alerts[0], no_object, deepest):
        path = str(tmp_path / f"{alert['diaSourceId']}.png")
        rendered = render_alert(alert, path)
        _check_png(path, rendered)
        assert rendered.n_points["current"] == 1
        assert rendered.n_points["source"] == len(alert["prvDiaSources"] or [])


def test_our_stamp_marks_source_at_x_minus_cutminx_minus_1(ours):
    alert = load_alerts(ours)[0]
    src = alert["diaSource"]
    stamp = read_stamp(alert["cutoutDifference"], src)
    h = fits.getheader(io.BytesIO(alert["cutoutDifference"]))
    assert stamp.x == pytest.approx(src["x"] - h["CUTMINX"] - 1, abs=1e-4)
    assert stamp.y == pytest.approx(src["y"] - h["CUTMINY"] - 1, abs=1e-4)
    assert stamp.unit == "nJy"
    assert stamp.variance is not None and stamp.variance.shape == stamp.image.shape


def _fits(header: dict, side: int = 20) -> bytes:
    hdu = fits.PrimaryHDU(np.arange(side * side, dtype=np.float32).reshape(side, side))
    hdu.header.update(header)
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"CRPIX1": 8.5, "CRPIX2": 11.0, "CUTMINX": 100, "CUTMINY": 200}, (7.5, 10.0)),
        ({"CUTMINX": 100, "CUTMINY": 200}, (4.25, 2.5)),
        ({}, (9.5, 9.5)),
    ],
    ids=["crpix", "cutmin-only", "centre"],
)
def test_stamp_position_rules(header, expected):
    stamp = read_stamp(_fits(header), {"x": 105.25, "y": 203.5})
    assert (stamp.x, stamp.y) == expected


def test_missing_stamp_and_bad_bytes():
    assert read_stamp(None) is None
    with pytest.raises(InputError, match="not a FITS file"):
        read_stamp(b"not fits at all" * 200)


def test_alert_without_stamps_or_history_renders(ours, tmp_path):
    alert = dict(load_alerts(ours)[0])
    alert.update(
        cutoutDifference=None, cutoutScience=None, cutoutTemplate=None, prvDiaForcedSources=None
    )
    alert["prvDiaSources"] = None
    path = str(tmp_path / "bare.png")
    rendered = render_alert(alert, path)
    assert rendered.stamp_boxes == {}
    assert rendered.n_points == {"source": 0, "forced": 0, "current": 1}
    assert imread(path).shape[:2] == (850, 1200)


def test_light_curve_drops_non_finite_and_empty_has_columns():
    rows = [
        {"band": "g", "midpointMjdTai": 3.0, "psfFlux": 1.0, "psfFluxErr": 0.1},
        {"band": "r", "midpointMjdTai": 1.0, "psfFlux": None, "psfFluxErr": None},
        {"band": "r", "midpointMjdTai": 2.0, "psfFlux": float("nan"), "psfFluxErr": 1.0},
        {"band": "r", "midpointMjdTai": 0.5, "psfFlux": -4.0, "psfFluxErr": 2.0},
    ]
    alert = {"diaSource": {"band": "g", "midpointMjdTai": 4.0, "psfFlux": 9.0, "psfFluxErr": 1.0}}
    lc = light_curve({**alert, "prvDiaSources": rows, "prvDiaForcedSources": rows[:1]})
    assert lc["midpointMjdTai"].tolist() == [0.5, 3.0, 3.0, 4.0]
    assert lc["kind"].tolist() == ["source", "forced", "source", "current"]
    assert lc["psfFlux"].tolist() == [-4.0, 1.0, 1.0, 9.0]
    empty = light_curve({"diaSource": None})
    assert len(empty) == 0
    assert list(empty.columns) == ["kind", "band", "midpointMjdTai", "psfFlux", "psfFluxErr"]


def test_normalize_maps_all_null_records_only_and_keeps_input():
    rec = {"diaSourceId": 1, "diaObject": {"a": None, "b": None}, "ssSource": {"a": 1, "b": None}}
    out = normalize_alert(rec)
    assert out["diaObject"] is None
    assert out["ssSource"] == {"a": 1, "b": None}
    assert rec["diaObject"] == {"a": None, "b": None}


def test_select_by_id_and_unknown_id(ours):
    alerts = load_alerts(ours)
    third = alerts[2]["diaSourceId"]
    assert select_alert(alerts, third) is alerts[2]
    assert select_alert(alerts) is alerts[0]
    with pytest.raises(InputError, match=r"x\.avro: no alert with diaSourceId 42; it holds"):
        select_alert(alerts, 42, "x.avro")
    with pytest.raises(InputError, match="holds no alert"):
        select_alert([], None, "x.avro")


def test_cli_summary_png_and_errors(ours, tmp_path, capsys):
    alerts = load_alerts(ours)
    wanted = alerts[3]["diaSourceId"]
    assert main(["show", ours, "--id", str(wanted)]) == 0
    out = capsys.readouterr().out
    assert "alert 4 of 12" in out
    assert f"diaSourceId          {wanted}" in out
    assert "psfFlux [nJy]" in out and "prvDiaSources" in out

    png = tmp_path / "one.png"
    assert main(["show", ours, "--png", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_SIGNATURE

    assert main(["show", ours, "--id", "42"]) == 2
    assert "no alert with diaSourceId 42" in capsys.readouterr().err
    bogus = tmp_path / "bogus.avro"
    bogus.write_bytes(b"hello")
    assert main(["show", str(bogus)]) == 2
    assert "not an Avro container file" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "missing.avro")]) == 2
    assert "no such alert file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ours_sso(tmp_path_factory) -> str:
    """diapipe alerts of which the first 3 are solar-system alerts (as the pipeline makes them)."""
    from tasks.ssoassociate import associate_solar_system

    from .test_sso_alerts import _ephemerides

    bundle, new, objects, hist, forced = make_alert_inputs(seed=5, n_alerts=6, depth=4, forced=3)
    new = new.copy()
    sso = np.arange(3)
    eph = _ephemerides(new.iloc[sso])
    res = associate_solar_system(
        new.iloc[sso], eph, bundle.difference.wcs, bundle.difference.image.shape
    )
    new.loc[new.index[sso], "diaObjectId"] = 0
    new.loc[new.index[sso], "ssObjectId"] = res.sso_sources["ssObjectId"].to_numpy()
    new.loc[new.index[sso], "trailLength"] = 2.5
    batch = package_alerts(
        new,
        objects,
        hist,
        forced,
        make_cutouts(new, bundle),
        bundle.visit,
        ss_sources=res.ss_sources,
        orbits=res.orbits,
    )
    out = tmp_path_factory.mktemp("viewer-sso") / "alerts"
    return write_alerts(batch, AlertStoreConfig(location=str(out)))


def test_sso_alert_shows_identity_and_motion(ours_sso, tmp_path):
    alerts = load_alerts(ours_sso)
    sso = [a for a in alerts if is_solar_system(a)]
    assert len(sso) == 3 and not any(is_solar_system(a) for a in alerts if a not in sso)
    alert = sso[0]
    rows = dict(solar_system_rows(alert))
    assert rows["ssObjectId"] == str(alert["ssSource"]["ssObjectId"])
    assert rows["designation"] == alert["ssSource"]["designation"] == "2004 JQ12"
    assert rows["rate [deg/day]"].startswith("0.2100 (RA -0.2000, Dec +0.0640)")
    assert rows["trail [arcsec, deg]"].startswith("2.50 at")
    assert rows["orbit a [AU], e, i [deg], H"] == "2.763, 0.294, 7.53, 16.45"
    png = str(tmp_path / "sso.png")
    text = show_alert(ours_sso, alert["diaSourceId"], png=png)
    assert "solar-system object" in text and "2004 JQ12" in text and "deg/day" in text
    rendered = render_alert(alert, png)
    assert rendered.motion and rendered.n_points == {}
    _check_png(png, rendered)
    # the light-curve panel of an ordinary alert is not used for it
    other = render_alert(next(a for a in alerts if not is_solar_system(a)), png)
    assert not other.motion and other.n_points["current"] == 1
