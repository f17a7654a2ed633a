"""The bundle reader: a valid bundle reads back exactly; every bad input names file and cause."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from core.bundle import (
    MASK_PLANES,
    ReaderConfig,
    read_detector_bundle,
    read_visit_info,
)
from core.errors import InputError

VISIT, DETECTOR, SHAPE = 42, 7, (64, 80)


def _visit_json(**over) -> dict:
    d = {
        "visit": VISIT,
        "band": "r",
        "midpointMjdTai": 61000.25,
        "exposureTime": 30.0,
        "boresightRa": 150.0,
        "boresightDec": 2.0,
        "rotAngle": 10.0,
        "observation_reason": "wfd",
        "target_name": "test-field",
        "detectors": [DETECTOR, 8],
    }
    d.update(over)
    return d


def _header(ra=150.0, dec=2.0) -> fits.Header:
    h = fits.Header()
    scale = 0.2 / 3600
    h.update(
        CTYPE1="RA---TAN",
        CTYPE2="DEC--TAN",
        CRVAL1=ra,
        CRVAL2=dec,
        CRPIX1=40.5,
        CRPIX2=32.5,
        CD1_1=-scale,
        CD1_2=0.0,
        CD2_1=0.0,
        CD2_2=scale,
        PHOTCERR=0.3,
        BUNIT="count",
        ROTPA=10.0,
        BAND="r",
    )
    # PHOTCALIB has 9 letters: a HIERARCH card (as the bundle spec names it).
    h["HIERARCH PHOTCALIB"] = 57.5
    return h


def _psf(side=11, sigma=1.5) -> np.ndarray:
    y, x = np.mgrid[:side, :side] - side // 2
    p = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return p / p.sum()


def _write_fits(path: Path, rng, *, header=None, psf=None, image=None, variance=None, drop=None):
    header = _header() if header is None else header
    image = rng.normal(0, 10, SHAPE).astype(np.float32) if image is None else image
    variance = np.full(SHAPE, 100, np.float32) if variance is None else variance
    mask = np.zeros(SHAPE, np.int32)
    mh = fits.Header([(f"HIERARCH MP_{k}", v) for k, v in MASK_PLANES.items()])
    hdus = [
        fits.PrimaryHDU(),
        fits.ImageHDU(image, header, name="IMAGE"),
        fits.ImageHDU(mask, mh, name="MASK"),
        fits.ImageHDU(variance, name="VARIANCE"),
        fits.ImageHDU(_psf() if psf is None else psf, name="PSF"),
    ]
    hdus = [h for h in hdus if h.name != drop]
    fits.HDUList(hdus).writeto(path, overwrite=True)


def _sources(n=5, seed=1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "x": rng.uniform(5, SHAPE[1] - 5, n),
            "y": rng.uniform(5, SHAPE[0] - 5, n),
            "xErr": np.full(n, 0.1, np.float32),
            "yErr": np.full(n, 0.1, np.float32),
            "psfInstFlux": rng.uniform(100, 1000, n).astype(np.float32),
            "psfInstFluxErr": np.full(n, 10.0, np.float32),
            "bboxSize": np.full(n, 20, np.int64),
            "pixelFlags_bad": np.zeros(n, bool),
        }
    )


def make_bundle(root: Path, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    vdir = root / str(VISIT)
    ddir = vdir / str(DETECTOR)
    ddir.mkdir(parents=True, exist_ok=True)
    (vdir / "visit.json").write_text(json.dumps(_visit_json()))
    for kind in ("difference", "science", "template"):
        _write_fits(ddir / f"{kind}.fits", rng)
    _sources().to_parquet(ddir / "diaSources.parquet")
    return ddir


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    return make_bundle(tmp_path)


def test_valid_bundle_reads_back(bundle_dir, tmp_path):
    b = read_detector_bundle(str(tmp_path), VISIT, DETECTOR)
    assert b.visit.band == "r" and b.visit.detectors == (DETECTOR, 8)
    assert b.detector == DETECTOR
    assert len(b.sources) == 5
    pd.testing.assert_frame_equal(b.sources, _sources())
    assert b.difference.image.dtype == np.float32 and b.difference.shape == SHAPE
    assert b.difference.mask.dtype == np.int32
    assert b.difference.photo_calib == 57.5 and b.difference.photo_calib_err == 0.3
    assert b.difference.header["ROTPA"] == 10.0
    assert np.isclose(b.science.psf.sum(), 1.0)
    # WCS: CRPIX (1-based) maps to CRVAL with 1-based evaluation.
    ra, dec = b.template.wcs.all_pix2world([[39.5, 31.5]], 0)[0]
    assert ra == pytest.approx(150.0) and dec == pytest.approx(2.0)
    assert set(b.checksums) == {
        "diaSources.parquet",
        "difference.fits",
        "science.fits",
        "template.fits",
    }
    assert all(b.checksums.values())


def test_empty_catalog_is_valid(bundle_dir, tmp_path):
    _sources(0).to_parquet(bundle_dir / "diaSources.parquet")
    b = read_detector_bundle(str(tmp_path), VISIT, DETECTOR)
    assert b.sources.empty
    assert {"x", "y", "psfInstFlux", "psfInstFluxErr"} <= set(b.sources.columns)


def test_reads_through_fsspec_memory_filesystem(bundle_dir, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in tmp_path.rglob("*"):
        if p.is_file():
            fs.pipe(f"/bundle/{p.relative_to(tmp_path)}", p.read_bytes())
    b = read_detector_bundle("memory://bundle", VISIT, DETECTOR)
    assert len(b.sources) == 5


def _rewrite_visit(d: Path, **over):
    (d.parent / "visit.json").write_text(json.dumps(_visit_json(**over)))


def _drop_visit_field(d: Path, field: str):
    v = _visit_json()
    del v[field]
    (d.parent / "visit.json").write_text(json.dumps(v))


def _rewrite_sources(d: Path, df: pd.DataFrame):
    df.to_parquet(d / "diaSources.parquet")


def _with(**cols):
    def mutate(d: Path):
        df = _sources()
        for k, v in cols.items():
            if v is None:
                df = df.drop(columns=k)
            else:
                df[k] = v
        _rewrite_sources(d, df)

    return mutate


def _fits(kind="difference", **kw):
    def mutate(d: Path):
        _write_fits(d / f"{kind}.fits", np.random.default_rng(5), **kw)

    return mutate


def _header_with(**cards):
    h = _header()
    for k, v in cards.items():
        k = "HIERARCH PHOTCALIB" if k == "PHOTCALIB" else k
        if v is None:
            del h[k]
        else:
            h[k] = v
    return h


def _truncate(kind):
    def mutate(d: Path):
        p = d / f"{kind}.fits"
        p.write_bytes(p.read_bytes()[:5000])

    return mutate


nan5 = np.array([1.0, np.nan, 3.0, 4.0, 5.0])
BAD_CASES = [
    ("visit.json missing", lambda d: (d.parent / "visit.json").unlink(), r"visit\.json is missing"),
    (
        "visit.json not JSON",
        lambda d: (d.parent / "visit.json").write_text("{oops"),
        "not valid JSON",
    ),
    (
        "visit.json is a list",
        lambda d: (d.parent / "visit.json").write_text("[1]"),
        "expected a JSON object",
    ),
    ("visit.json missing band", lambda d: _drop_visit_field(d, "band"), "missing field.*band"),
    ("band not ugrizy", lambda d: _rewrite_visit(d, band="q"), "band must be one of ugrizy"),
    (
        "visit field mismatch",
        lambda d: _rewrite_visit(d, visit=43),
        "visit is 43 but the folder says 42",
    ),
    ("exposureTime zero", lambda d: _rewrite_visit(d, exposureTime=0), "exposureTime must be > 0"),
    (
        "midpoint is a string",
        lambda d: _rewrite_visit(d, midpointMjdTai="soon"),
        "'midpointMjdTai' must be",
    ),
    (
        "detector not in visit",
        lambda d: _rewrite_visit(d, detectors=[1, 2]),
        "detector 7 is not in",
    ),
    (
        "detectors not ints",
        lambda d: _rewrite_visit(d, detectors=["7"]),
        "detectors must be a list of integers",
    ),
    (
        "catalog missing",
        lambda d: (d / "diaSources.parquet").unlink(),
        r"diaSources\.parquet: DiaSource catalog is missing",
    ),
    (
        "catalog not parquet",
        lambda d: (d / "diaSources.parquet").write_bytes(b"PAR1 nope"),
        "not a readable Parquet",
    ),
    ("missing psfInstFlux", _with(psfInstFlux=None), "required column.*psfInstFlux"),
    ("missing x", _with(x=None), "required column.*x"),
    ("NaN x", _with(x=nan5), r"column 'x' has 1 NaN/inf value\(s\) \(first at row 1\)"),
    (
        "inf flux",
        _with(psfInstFlux=np.array([1, np.inf, 3, 4, 5.0])),
        "'psfInstFlux' has 1 NaN/inf",
    ),
    ("string flux", _with(psfInstFlux=["a", "b", "c", "d", "e"]), "'psfInstFlux' must be numeric"),
    (
        "negative flux error",
        _with(psfInstFluxErr=np.array([1, -1, 3, 4, 5.0])),
        "'psfInstFluxErr' has negative",
    ),
    (
        "flag not boolean",
        _with(pixelFlags_bad=np.arange(5)),
        "flag column 'pixelFlags_bad' must be boolean",
    ),
    (
        "duplicate diaSourceId",
        _with(diaSourceId=np.array([1, 2, 2, 3, 4])),
        "diaSourceId has 1 duplicate",
    ),
    ("float diaSourceId", _with(diaSourceId=nan5), "diaSourceId must be non-null integers"),
    (
        "image missing",
        lambda d: (d / "science.fits").unlink(),
        r"science\.fits: image file is missing",
    ),
    (
        "truncated FITS",
        _truncate("template"),
        r"template\.fits: not a readable FITS|template\.fits: HDU",
    ),
    ("not FITS", lambda d: (d / "difference.fits").write_bytes(b"hello"), "not a readable FITS"),
    ("no PSF HDU", _fits(drop="PSF"), "HDU PSF is missing"),
    (
        "no VARIANCE HDU",
        _fits("science", drop="VARIANCE"),
        r"science\.fits: HDU VARIANCE is missing",
    ),
    (
        "PHOTCALIB negative",
        _fits("science", header=_header_with(PHOTCALIB=-1.0)),
        r"science\.fits: PHOTCALIB must be > 0, got -1\.0",
    ),
    ("PHOTCALIB zero", _fits(header=_header_with(PHOTCALIB=0.0)), "PHOTCALIB must be > 0"),
    ("PHOTCALIB missing", _fits(header=_header_with(PHOTCALIB=None)), "has no PHOTCALIB"),
    ("PHOTCERR negative", _fits(header=_header_with(PHOTCERR=-2.0)), "PHOTCERR must be >= 0"),
    ("WCS missing", _fits(header=_header_with(CTYPE1=None, CTYPE2=None)), "no celestial WCS"),
    (
        "WCS singular",
        _fits(header=_header_with(CD1_1=0.0, CD2_2=0.0)),
        "singular|cannot be evaluated|non-finite",
    ),
    (
        "WCS far from pointing",
        _fits(header=_header(ra=200.0, dec=-30.0)),
        "deg from the visit boresight",
    ),
    (
        "band mismatch in header",
        _fits("template", header=_header_with(BAND="g")),
        r"template\.fits: band 'g'.*disagrees",
    ),
    ("PSF even-sized", _fits(psf=_psf(10)), "odd-sized square"),
    ("PSF not normalised", _fits(psf=_psf() * 2), "PSF must sum to 1"),
    ("PSF has NaN", _fits(psf=np.where(_psf() > 0.05, np.nan, _psf())), "PSF has non-finite"),
    (
        "negative variance",
        _fits(variance=np.full(SHAPE, -1, np.float32)),
        "VARIANCE has 5120 negative",
    ),
    ("integer image", _fits(image=np.zeros(SHAPE, np.int16)), "IMAGE must be floating point"),
    ("shape mismatch", _fits("science", image=np.zeros((10, 10), np.float32)), "MASK shape"),
]


@pytest.mark.parametrize(
    ("mutate", "match"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_input_names_file_and_problem(bundle_dir, tmp_path, mutate, match):
    mutate(bundle_dir)
    with pytest.raises(InputError, match=match) as info:
        read_detector_bundle(str(tmp_path), VISIT, DETECTOR)
    assert str(tmp_path) in str(info.value), "the error names the file"


def test_too_many_rows_refused(bundle_dir, tmp_path):
    with pytest.raises(InputError, match="6 rows is more than max_sources=5"):
        _rewrite_sources(bundle_dir, _sources(6))
        read_detector_bundle(str(tmp_path), VISIT, DETECTOR, config=ReaderConfig(max_sources=5))


def test_visit_info_round_trip(bundle_dir, tmp_path):
    info = read_visit_info(str(tmp_path), VISIT)
    assert info.to_json_dict() == _visit_json()
