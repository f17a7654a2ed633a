"""A simulated visit through the real stages up to alerts: every packet validates.

sim writes a detector bundle; the bundle reader, calibration and DiaObject
summary of diapipe turn it into SDM rows (all sources make new DiaObjects, as
on the first visit of a field); then stamps and packets are made and each is
checked against the official schema, and each stamp against the bundle.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from astropy.nddata import CCDData
from lsst.alert.packet import Schema, get_schema_path

from alerts.cutouts import make_cutouts
from alerts.packet import PackagingConfig, decode_alert, package_alerts
from apdb import sdm
from core.bundle import read_detector_bundle
from core.ids import IdPacker
from sim import Survey, SurveyConfig
from tasks.calibrate import CalibrateConfig, calibrate
from tasks.summarise import SummaryConfig, summarise


@pytest.fixture(scope="module")
def visit_alerts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sim"))
    survey = Survey(SurveyConfig(seed=4, n_detectors=1, detector_size=(512, 512), n_visits=3))
    survey.write_visit(root, 0)
    info = survey.visit_info(0)
    detector = info.detectors[0]
    bundle = read_detector_bundle(root, info.visit, detector)
    sources = calibrate(
        bundle.sources,
        bundle,
        CalibrateConfig(),
        id_packer=IdPacker(),
        time_processed_mjd=info.midpointMjdTai + 0.01,
    )
    sources["diaObjectId"] = sources["diaSourceId"].astype("Int64")
    objects = summarise(
        sdm.empty_frame("DiaObject"),
        sdm.empty_frame("DiaSource"),
        sources,
        SummaryConfig(),
        time_mjd=info.midpointMjdTai,
    )
    cutouts = make_cutouts(sources, bundle)
    batch = package_alerts(
        sources,
        objects,
        sdm.empty_frame("DiaSource"),
        sdm.empty_frame("DiaForcedSource"),
        cutouts,
        info,
        PackagingConfig(),
    )
    return bundle, sources, batch


def test_every_packet_of_the_visit_validates(visit_alerts):
    bundle, sources, batch = visit_alerts
    assert len(batch) == len(sources) > 0
    official = Schema.from_file(f"{get_schema_path(11, 1)}/lsst.v11_1.alert.avsc")
    for sid, payload in zip(batch.dia_source_ids.tolist(), batch.payloads, strict=True):
        record = decode_alert(payload, batch.schema)
        assert official.validate(record)
        assert record["diaSourceId"] == sid
        assert record["diaObject"]["diaObjectId"] == sid
        assert record["observation_reason"] == bundle.visit.observation_reason


def test_stamps_of_the_visit_match_the_bundle(visit_alerts):
    bundle, sources, batch = visit_alerts
    records = [decode_alert(p, batch.schema) for p in batch.payloads[:10]]
    for rec in records:
        ds = rec["diaSource"]
        diff = CCDData.read(io.BytesIO(rec["cutoutDifference"]), format="fits")
        x0, y0 = diff.meta["CUTMINX"] + 1, diff.meta["CUTMINY"] + 1  # the stamp's first pixel
        ra, dec = diff.wcs.all_pix2world([[ds["x"] - x0, ds["y"] - y0]], 0)[0]
        assert np.hypot((ra - ds["ra"]) * np.cos(np.deg2rad(dec)), dec - ds["dec"]) * 3.6e6 < 1.0
        ny, nx = diff.shape
        exp = bundle.difference
        ys, xs = slice(max(y0, 0), y0 + ny), slice(max(x0, 0), x0 + nx)
        want = exp.image[ys, xs] * np.float32(exp.photo_calib)
        got = diff.data[ys.start - y0 : ys.start - y0 + want.shape[0], xs.start - x0 :][
            :, : want.shape[1]
        ]
        np.testing.assert_array_equal(got, want)
