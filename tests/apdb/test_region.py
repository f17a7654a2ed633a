"""Sky regions: exact containment and a pixel cover that never misses a point."""

from __future__ import annotations

import hpgeom
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apdb.region import Circle, Polygon
from core.errors import InputError


def _in_ranges(pixels: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(ranges[:, 0], pixels, side="right") - 1
    ok = idx >= 0
    ok[ok] &= pixels[ok] < ranges[idx[ok], 1]
    return ok


def _around(ra0, dec0, radius_deg, n, seed):
    """Random positions within 2 x radius of (ra0, dec0), on the unit sphere."""
    rng = np.random.default_rng(seed)
    centre = np.array(
        [
            np.cos(np.radians(dec0)) * np.cos(np.radians(ra0)),
            np.cos(np.radians(dec0)) * np.sin(np.radians(ra0)),
            np.sin(np.radians(dec0)),
        ]
    )
    v = centre + rng.normal(size=(n, 3)) * np.radians(2 * radius_deg)
    v /= np.linalg.norm(v, axis=1)[:, None]
    return np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360.0, np.degrees(np.arcsin(v[:, 2]))


@settings(max_examples=40, deadline=None)
@given(
    ra0=st.floats(0, 360, exclude_max=True),
    dec0=st.floats(-90, 90),
    radius=st.floats(1e-3, 2.0),
    order=st.integers(8, 20),
)
def test_circle_cover_contains_every_inside_point(ra0, dec0, radius, order):
    circle = Circle(ra0, dec0, radius)
    ra, dec = _around(ra0, dec0, radius, 2000, seed=int(ra0 * 1000) % 2**31)
    inside = circle.contains(ra, dec)
    ranges = circle.pixel_ranges(order, max_ranges=16)
    assert len(ranges) <= 16
    pixels = hpgeom.angle_to_pixel(2**order, ra, dec)
    assert np.all(_in_ranges(pixels, ranges)[inside])


@settings(max_examples=40, deadline=None)
@given(
    ra0=st.floats(0, 360, exclude_max=True),
    dec0=st.floats(-85.0, 85.0),
    half=st.floats(0.01, 1.0),
    rot=st.floats(0, 90),
)
def test_polygon_cover_contains_every_inside_point(ra0, dec0, half, rot):
    # A rotated square (a detector footprint) built in the tangent plane. Its
    # corners are offset by up to 1.41° in δ and by that over cos δ in α, so
    # within ~1.5° of a pole they pass the pole or fold over (an invalid
    # polygon, which Polygon rejects): the centres stay within ±85°.
    angles = np.radians(rot + np.array([45.0, 135.0, 225.0, 315.0]))
    x, y = half * np.sqrt(2) * np.cos(angles), half * np.sqrt(2) * np.sin(angles)
    dec_v = dec0 + y
    ra_v = ra0 + x / np.cos(np.radians(dec_v))
    poly = Polygon(ra_v % 360.0, dec_v)
    ra, dec = _around(ra0, dec0, 1.5 * half, 2000, seed=int(dec0 * 1000) % 2**31)
    inside = poly.contains(ra, dec)
    assert inside.any()
    pixels = hpgeom.angle_to_pixel(2**16, ra, dec)
    assert np.all(_in_ranges(pixels, poly.pixel_ranges(16))[inside])


def test_polygon_contains_is_winding_independent_and_wraps():
    ra = [359.9, 0.1, 0.1, 359.9]
    dec = [-0.1, -0.1, 0.1, 0.1]
    pts_ra = np.array([0.0, 359.95, 0.05, 0.2, 359.8, 180.0])
    pts_dec = np.array([0.0, 0.05, -0.05, 0.0, 0.0, 0.0])
    expected = [True, True, True, False, False, False]
    assert Polygon(ra, dec).contains(pts_ra, pts_dec).tolist() == expected
    assert Polygon(ra[::-1], dec[::-1]).contains(pts_ra, pts_dec).tolist() == expected


def test_circle_contains_across_the_pole_and_nan_is_outside():
    circle = Circle(0.0, 89.9, 0.2)  # reaches 0.1 deg past the pole
    ra = np.array([180.0, 180.0, 90.0, np.nan])
    dec = np.array([89.95, 89.85, 89.9, 89.9])
    assert circle.contains(ra, dec).tolist() == [True, False, True, False]


@pytest.mark.parametrize(
    ("ra", "dec", "match"),
    [
        ([0, 1], [0, 1], "at least 3 vertices"),
        ([0, 1, np.nan], [0, 1, 1], "finite"),
        ([0, 1, 1, 0], [0, 0, 91, 1], r"within \[-90, 90\]"),
        ([0, 0, 1], [0, 0, 1], "coincide"),
        ([0, 2, 1, 2, 0], [0, 0, 0.5, 2, 2], "convex"),
    ],
    ids=["two-vertices", "nan", "dec-91", "repeated", "concave"],
)
def test_bad_polygons_are_refused(ra, dec, match):
    with pytest.raises(InputError, match=match):
        Polygon(ra, dec)


@pytest.mark.parametrize("radius", [0.0, -1.0, 180.0], ids=["zero", "negative", "half-sky"])
def test_bad_circle_radius_is_refused(radius):
    with pytest.raises(InputError, match="radius_deg"):
        Circle(10.0, 10.0, radius)


@pytest.mark.parametrize(
    ("ra", "dec"),
    [
        ([359.9, 0.1, 0.1, 359.9], [-0.1, -0.1, 0.1, 0.1]),
        ([0.0, 90.0, 180.0, 270.0], [89.8] * 4),
        ([150.0, 150.3, 150.25, 149.95], [-60.0, -59.95, -59.7, -59.75]),
    ],
    ids=["ra-wrap", "pole", "rotated"],
)
def test_padded_polygon_grows_every_edge_by_the_pad(ra, dec):
    poly = Polygon(ra, dec)
    pad = 2.0  # arcsec
    grown = poly.padded(pad)
    v = np.stack(
        [
            np.cos(np.radians(dec)) * np.cos(np.radians(ra)),
            np.cos(np.radians(dec)) * np.sin(np.radians(ra)),
            np.sin(np.radians(dec)),
        ],
        axis=1,
    )
    mids = v + np.roll(v, -1, axis=0)
    mids /= np.linalg.norm(mids, axis=1)[:, None]
    centre = v.sum(axis=0) / np.linalg.norm(v.sum(axis=0))

    def step_out(points, arcsec):
        # Move each point away from the centre along the great circle through both.
        away = points * (points @ centre)[:, None] - centre
        away /= np.linalg.norm(away, axis=1)[:, None]
        ang = np.radians(arcsec / 3600.0)
        p = points * np.cos(ang) + away * np.sin(ang)
        return np.degrees(np.arctan2(p[:, 1], p[:, 0])) % 360.0, np.degrees(np.arcsin(p[:, 2]))

    near = step_out(mids, 0.9 * pad)
    far = step_out(mids, 3.0 * pad)
    assert not poly.contains(*near).any()
    assert grown.contains(*near).all()
    assert not grown.contains(*far).any()
    assert poly.padded(0.0) is poly
