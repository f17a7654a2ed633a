"""A corpus of malformed bundles through the whole flow.

One visit, one detector per case, all made from one valid simulated detector.
Every malformed detector fails alone with an error that names its file and
cause, stores nothing and sends nothing; every valid variant is processed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from apdb import make_apdb
from core.errors import InputError
from flows.visit import run_visit
from tests.conftest import V0, make_config

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _edit_fits(name, fn):
    def mutate(d: Path):
        with fits.open(d / name) as hdus:
            hdus = fits.HDUList([h.copy() for h in hdus])
        fn(hdus)
        hdus.writeto(d / name, overwrite=True)

    return mutate


def _edit_sources(fn):
    def mutate(d: Path):
        df = pd.read_parquet(d / "diaSources.parquet")
        df = fn(df)
        df.to_parquet(d / "diaSources.parquet")

    return mutate


def _set(frame, col, values):
    frame = frame.copy()
    frame[col] = values
    return frame


def _nan_first(col):
    def fn(df):
        v = df[col].to_numpy(dtype=float).copy()
        v[0] = np.nan
        return _set(df, col, v)

    return fn


def _header(name, **cards):
    def fn(hdus):
        for k, v in cards.items():
            if v is None:
                del hdus["IMAGE"].header[k]
            else:
                hdus["IMAGE"].header[k] = v

    return _edit_fits(name, fn)


def _shift(name, key, delta):
    def fn(hdus):
        hdus["IMAGE"].header[key] += delta

    return _edit_fits(name, fn)


def _psf(name, fn):
    def edit(hdus):
        hdus["PSF"].data = fn(hdus["PSF"].data.astype(np.float64))

    return _edit_fits(name, edit)


def _rename_hdu(name, old, new):
    def fn(hdus):
        hdus[old].name = new

    return _edit_fits(name, fn)


def _plane(name, hdu, fn):
    def edit(hdus):
        hdus[hdu].data = fn(hdus[hdu].data)

    return _edit_fits(name, edit)


def _big_catalog(df):
    n = 1_000_000
    rng = np.random.default_rng(3)
    return pd.DataFrame(
        {
            "x": rng.uniform(0, 255, n),
            "y": rng.uniform(0, 255, n),
            "psfInstFlux": rng.normal(1000, 10, n).astype(np.float32),
            "psfInstFluxErr": np.full(n, 10, np.float32),
        }
    )


def _psf_nan(p):
    p = p.copy()
    p[0, 0] = np.nan
    return p


def _psf_inf(p):
    p = p.copy()
    p[0, 0] = np.inf
    return p


def _image_nan(a):
    a = a.copy()
    a[10:20, 10:20] = np.nan
    return a


FAIL, OK = "fail", "ok"
CASES = [
    (
        "truncated FITS",
        lambda d: (d / "difference.fits").write_bytes((d / "difference.fits").read_bytes()[:4000]),
        FAIL,
        r"difference\.fits: (not a readable FITS|HDU)",
    ),
    (
        "corrupt FITS header",
        lambda d: (d / "science.fits").write_bytes(
            b"\x00" * 80 + (d / "science.fits").read_bytes()[80:]
        ),
        FAIL,
        r"science\.fits: not a readable FITS",
    ),
    (
        "image file missing",
        lambda d: (d / "template.fits").unlink(),
        FAIL,
        r"template\.fits: image file is missing",
    ),
    (
        "wrong HDU name",
        _rename_hdu("science.fits", "VARIANCE", "VAR"),
        FAIL,
        r"science\.fits: HDU VARIANCE is missing",
    ),
    (
        "PSF with NaN",
        _psf("difference.fits", _psf_nan),
        FAIL,
        r"difference\.fits: PSF has non-finite",
    ),
    ("PSF with inf", _psf("science.fits", _psf_inf), FAIL, r"science\.fits: PSF has non-finite"),
    (
        "PSF even-sized",
        _psf("difference.fits", lambda p: p[:-1, :-1] / p[:-1, :-1].sum()),
        FAIL,
        r"odd-sized square",
    ),
    (
        "PSF not normalised",
        _psf("template.fits", lambda p: p * 3),
        FAIL,
        r"template\.fits: PSF must sum to 1",
    ),
    (
        "negative variance",
        _plane("difference.fits", "VARIANCE", lambda v: -np.abs(v) - 1),
        FAIL,
        r"difference\.fits: VARIANCE has \d+ negative",
    ),
    (
        "integer image",
        _plane("science.fits", "IMAGE", lambda a: a.astype(np.int32)),
        FAIL,
        r"science\.fits: IMAGE must be floating point",
    ),
    (
        "mask shape mismatch",
        _plane("difference.fits", "MASK", lambda m: m[:-5]),
        FAIL,
        r"difference\.fits: MASK shape",
    ),
    (
        "PHOTCALIB negative",
        _header("difference.fits", PHOTCALIB=-1.0),
        FAIL,
        r"difference\.fits: PHOTCALIB must be > 0, got -1\.0",
    ),
    (
        "PHOTCALIB missing",
        _header("science.fits", PHOTCALIB=None),
        FAIL,
        r"science\.fits: IMAGE header has no PHOTCALIB",
    ),
    (
        "PHOTCALIB not a number",
        _header("template.fits", PHOTCALIB="bright"),
        FAIL,
        r"template\.fits: PHOTCALIB must be > 0",
    ),
    (
        "WCS missing",
        _header("difference.fits", CTYPE1=None, CTYPE2=None),
        FAIL,
        r"difference\.fits: IMAGE header has no celestial WCS",
    ),
    (
        "WCS singular",
        _header("difference.fits", CD1_1=0.0, CD1_2=0.0),
        FAIL,
        r"(?s)difference\.fits: .*WCS.*singular",
    ),
    (
        "WCS far off the pointing",
        _header("difference.fits", CRVAL1=200.0, CRVAL2=40.0),
        FAIL,
        r"difference\.fits: WCS puts the detector .* deg from the visit boresight",
    ),
    (
        "band mismatch between files",
        _header("template.fits", BAND="u", FILTER="u"),
        FAIL,
        r"template\.fits: band 'u'",
    ),
    (
        "catalog missing",
        lambda d: (d / "diaSources.parquet").unlink(),
        FAIL,
        r"diaSources\.parquet: DiaSource catalog is missing",
    ),
    (
        "catalog corrupt",
        lambda d: (d / "diaSources.parquet").write_bytes(b"PAR1garbage"),
        FAIL,
        r"diaSources\.parquet: not a readable Parquet",
    ),
    (
        "NaN x",
        _edit_sources(_nan_first("x")),
        FAIL,
        r"diaSources\.parquet: column 'x' has 1 NaN/inf",
    ),
    ("NaN y", _edit_sources(_nan_first("y")), FAIL, r"column 'y' has 1 NaN/inf"),
    (
        "inf flux",
        _edit_sources(
            lambda df: _set(
                df, "psfInstFlux", np.where(np.arange(len(df)) == 0, np.inf, df["psfInstFlux"])
            )
        ),
        FAIL,
        r"column 'psfInstFlux' has 1 NaN/inf",
    ),
    (
        "missing flux error column",
        _edit_sources(lambda df: df.drop(columns="psfInstFluxErr")),
        FAIL,
        r"required column\(s\) missing: psfInstFluxErr",
    ),
    (
        "string coordinates",
        _edit_sources(lambda df: _set(df, "x", df["x"].astype(str))),
        FAIL,
        r"column 'x' must be numeric",
    ),
    (
        "duplicate diaSourceIds",
        _edit_sources(lambda df: _set(df, "diaSourceId", np.zeros(len(df), np.int64))),
        FAIL,
        r"diaSourceId has \d+ duplicate",
    ),
    (
        "negative flux error",
        _edit_sources(lambda df: _set(df, "psfInstFluxErr", -df["psfInstFluxErr"])),
        FAIL,
        r"'psfInstFluxErr' has negative",
    ),
    (
        "flag as integer",
        _edit_sources(lambda df: _set(df, "pixelFlags_bad", df["pixelFlags_bad"].astype(np.int8))),
        FAIL,
        r"flag column 'pixelFlags_bad' must be boolean",
    ),
    (
        "1e6-row catalog",
        _edit_sources(_big_catalog),
        FAIL,
        r"diaSources\.parquet: 1000000 rows is more than max_sources=100000",
    ),
    ("empty catalog", _edit_sources(lambda df: df.iloc[:0]), OK, None),
    ("NaN pixels in the image", _plane("science.fits", "IMAGE", _image_nan), OK, None),
    (
        "extra unknown column",
        _edit_sources(lambda df: _set(df, "myColumn", np.arange(len(df)))),
        OK,
        None,
    ),
    (
        "float32 coordinates",
        _edit_sources(lambda df: _set(df, "x", df["x"].astype(np.float32))),
        OK,
        None,
    ),
    (
        "given unique diaSourceIds",
        _edit_sources(lambda df: _set(df, "diaSourceId", (np.arange(len(df)) + 1) << 20)),
        OK,
        None,
    ),
    ("sources off the image", _edit_sources(lambda df: _set(df, "x", df["x"] - 1000.0)), OK, None),
    ("untouched", lambda d: None, OK, None),
]


@pytest.fixture(scope="module")
def corpus(survey_root, tmp_path_factory):
    """Visit V0 with one detector per case, each a mutated copy of one valid detector."""
    src_visit = Path(survey_root) / str(V0)
    info = json.loads((src_visit / "visit.json").read_text())
    template = src_visit / str(info["detectors"][0])
    root = tmp_path_factory.mktemp("corpus")
    vdir = root / str(V0)
    vdir.mkdir()
    detectors = []
    for i, (_, mutate, _, _) in enumerate(CASES):
        det = 100 + i
        shutil.copytree(template, vdir / str(det))
        mutate(vdir / str(det))
        detectors.append(det)
    (vdir / "visit.json").write_text(json.dumps({**info, "detectors": detectors}))
    return str(root)


def test_corpus_has_at_least_30_malformed_bundles():
    assert sum(c[2] == FAIL for c in CASES) >= 28 and len(CASES) >= 30


def test_each_bad_detector_fails_alone_and_names_file_and_cause(corpus, tmp_path):
    config = make_config(tmp_path, cache=False, detectors_per_task=6)
    state, result = run_visit(corpus, V0, config)
    assert state.name == "Partial"
    apdb = make_apdb(config.apdb)
    stored = apdb.done_detectors(V0)
    problems = []
    for i, (name, _, expect, pattern) in enumerate(CASES):
        det = 100 + i
        alert_file = tmp_path / "alerts" / f"{V0}_{det}.avro"
        if expect == FAIL:
            error = result["failed"].get(det)
            if error is None or not re.search(pattern, error):
                problems.append(f"{name}: expected /{pattern}/, got {error!r}")
            if det in stored or alert_file.exists():
                problems.append(f"{name}: a failed detector stored or sent something")
        else:
            if det in result["failed"]:
                problems.append(f"{name}: valid input failed: {result['failed'][det]}")
            if det not in stored:
                problems.append(f"{name}: valid input not stored")
    assert not problems, "\n".join(problems)


def test_bad_visit_json_fails_the_visit_with_a_clear_error(corpus, tmp_path):
    root = tmp_path / "bundles"
    (root / str(V0)).mkdir(parents=True)
    info = json.loads((Path(corpus) / str(V0) / "visit.json").read_text())
    del info["band"]
    (root / str(V0) / "visit.json").write_text(json.dumps(info))
    state, result = run_visit(str(root), V0, make_config(tmp_path))
    assert state.is_failed()
    assert re.search(r"visit\.json: missing field\(s\) band", str(result))


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (
            _shift("template.fits", "CRVAL2", 0.01),
            r"template\.fits and .*difference\.fits: the WCSs disagree by [\d.]+ px "
            r"\(3[56](\.\d+)? arcsec\)",
        ),
        (
            _shift("science.fits", "CRPIX1", 0.5),
            r"science\.fits and .*difference\.fits: the WCSs disagree by 0\.5 px",
        ),
        (_shift("template.fits", "CRPIX2", 0.01), None),
    ],
    ids=["template 36 arcsec off", "science half a pixel off", "template 0.01 px off: accepted"],
)
def test_images_not_on_the_difference_image_grid_are_refused(
    survey_root, tmp_path, mutate, pattern
):
    from core.bundle import read_detector_bundle

    info = json.loads((Path(survey_root) / str(V0) / "visit.json").read_text())
    det = info["detectors"][0]
    shutil.copytree(Path(survey_root) / str(V0), tmp_path / str(V0))
    mutate(tmp_path / str(V0) / str(det))
    if pattern is None:
        assert read_detector_bundle(str(tmp_path), V0, det).template is not None
        return
    with pytest.raises(InputError, match=pattern):
        read_detector_bundle(str(tmp_path), V0, det)
