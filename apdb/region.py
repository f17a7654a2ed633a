"""Sky regions for APDB queries: convex spherical polygons and circles.

A region answers two questions: which HEALPix pixels (nest ordering) might
hold its points — the coarse index lookup that limits a query to nearby rows —
and, exactly, which of a set of positions lie inside it. Both work on unit
vectors, so RA wrap-around at 0/360 deg and the poles need no special case.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import hpgeom
import numpy as np
import numpy.typing as npt

from core.errors import InputError

__all__ = ["Circle", "Polygon", "Region", "unit_vectors"]

# hpgeom's HEALPix C library works up to order 29.
MAX_ORDER = 29


def unit_vectors(ra: npt.ArrayLike, dec: npt.ArrayLike) -> np.ndarray:
    """Cartesian unit vectors, shape ``(n, 3)``, of positions in degrees."""
    ra_r = np.radians(np.asarray(ra, dtype=np.float64))
    dec_r = np.radians(np.asarray(dec, dtype=np.float64))
    cos_dec = np.cos(dec_r)
    return np.stack([cos_dec * np.cos(ra_r), cos_dec * np.sin(ra_r), np.sin(dec_r)], axis=-1)


def _check_positions(
    ra: npt.ArrayLike, dec: npt.ArrayLike, what: str
) -> tuple[np.ndarray, np.ndarray]:
    ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
    dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
    if ra.shape != dec.shape:
        raise InputError(f"{what}: ra and dec differ in shape, {ra.shape} vs {dec.shape}")
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        raise InputError(f"{what}: ra/dec must be finite")
    if np.any(np.abs(dec) > 90.0):
        raise InputError(
            f"{what}: dec must be within [-90, 90] deg, got {dec[np.abs(dec) > 90][0]}"
        )
    return ra, dec


class Region(ABC):
    """A region of the sky."""

    @abstractmethod
    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Boolean mask of the positions (deg) inside the region; NaN is outside."""

    @abstractmethod
    def bounding_radius_deg(self) -> float:
        """Radius (deg) of a circle about the region's centre that holds it."""

    @abstractmethod
    def _hpx_ranges(self, order: int) -> np.ndarray:
        """``(n, 2)`` half-open nest pixel ranges at ``order`` that cover the region."""

    def pixel_ranges(self, order: int, max_ranges: int = 64) -> np.ndarray:
        """Half-open HEALPix nest pixel ranges at ``order`` that cover the region.

        The cover is computed at a coarser order chosen from the region size
        (about ten pixels across) and coarsened further until it has at most
        ``max_ranges`` ranges, then expressed at ``order``. It is conservative:
        every point of the region lies in one of the ranges.

        Parameters
        ----------
        order : int
            HEALPix order of the stored pixel index (nside = 2**order).
        max_ranges : int
            Upper bound on the number of ranges, which bounds the SQL size.

        Returns
        -------
        numpy.ndarray
            int64 array of shape ``(n, 2)``: ``[start, stop)`` at ``order``,
            sorted and disjoint.
        """
        if not 0 <= order <= MAX_ORDER:
            raise InputError(f"HEALPix order must be within [0, {MAX_ORDER}], got {order}")
        radius = max(self.bounding_radius_deg(), 1e-6)
        # Pixel size of order k is about 58.6 deg / 2**k; aim for ~10 pixels across.
        query = int(np.clip(math.floor(math.log2(58.6 * 5.0 / radius)), 0, order))
        ranges = self._hpx_ranges(query)
        while len(ranges) > max_ranges and query > 0:
            ranges = _merge(np.stack([ranges[:, 0] >> 2, (ranges[:, 1] + 3) >> 2], axis=1))
            query -= 1
        shift = 2 * (order - query)
        return (_merge(ranges).astype(np.int64) << shift).reshape(-1, 2)


def _merge(ranges: np.ndarray) -> np.ndarray:
    """Merge sorted, possibly overlapping or touching half-open ranges."""
    if len(ranges) == 0:
        return ranges.reshape(0, 2)
    ranges = ranges[np.argsort(ranges[:, 0], kind="stable")]
    starts, stops = ranges[:, 0], np.maximum.accumulate(ranges[:, 1])
    new = np.ones(len(ranges), dtype=bool)
    new[1:] = starts[1:] > stops[:-1]
    idx = np.flatnonzero(new)
    ends = np.append(idx[1:] - 1, len(ranges) - 1)
    return np.stack([starts[idx], stops[ends]], axis=1)


class Circle(Region):
    """A cone: all positions within ``radius_deg`` of (``ra``, ``dec``).

    Parameters
    ----------
    ra, dec : float
        Centre (deg, ICRS).
    radius_deg : float
        Angular radius (deg), in (0, 180).
    """

    def __init__(self, ra: float, dec: float, radius_deg: float):
        (ra_a,), (dec_a,) = _check_positions(ra, dec, "Circle centre")
        if not 0.0 < float(radius_deg) < 180.0:
            raise InputError(f"Circle: radius_deg must be in (0, 180), got {radius_deg}")
        self.ra = float(ra_a) % 360.0
        self.dec = float(dec_a)
        self.radius_deg = float(radius_deg)
        self._centre = unit_vectors(self.ra, self.dec)
        self._cos_r = math.cos(math.radians(self.radius_deg))

    def __repr__(self) -> str:
        return f"Circle(ra={self.ra!r}, dec={self.dec!r}, radius_deg={self.radius_deg!r})"

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Boolean mask of the positions (deg) within the radius; NaN is outside."""
        return unit_vectors(ra, dec) @ self._centre >= self._cos_r

    def bounding_radius_deg(self) -> float:
        """The circle's own radius (deg)."""
        return self.radius_deg

    def _hpx_ranges(self, order: int) -> np.ndarray:
        return np.asarray(
            hpgeom.query_circle(
                hpgeom.order_to_nside(order),
                self.ra,
                self.dec,
                self.radius_deg,
                inclusive=True,
                nest=True,
                return_pixel_ranges=True,
            ),
            dtype=np.int64,
        ).reshape(-1, 2)


class Polygon(Region):
    """A convex spherical polygon whose edges are great-circle arcs.

    Parameters
    ----------
    ra, dec : array-like of float
        Vertices (deg), at least three, in either winding order (e.g. the
        detector corners from the WCS). The polygon must be convex and smaller
        than a hemisphere.

    Raises
    ------
    InputError
        Fewer than three vertices, non-finite values, repeated vertices or a
        non-convex outline.
    """

    def __init__(self, ra, dec):
        ra_a, dec_a = _check_positions(ra, dec, "Polygon vertices")
        if ra_a.size < 3:
            raise InputError(f"Polygon: needs at least 3 vertices, got {ra_a.size}")
        verts = unit_vectors(ra_a, dec_a)
        normals = np.cross(verts, np.roll(verts, -1, axis=0))
        lengths = np.linalg.norm(normals, axis=1)
        if np.any(lengths < 1e-15):
            raise InputError("Polygon: consecutive vertices coincide or are antipodal")
        normals /= lengths[:, None]
        centre = verts.sum(axis=0)
        centre /= np.linalg.norm(centre)
        side = normals @ centre
        if np.all(side < 0):
            normals = -normals
            side = -side
        if not np.all(side > 0):
            raise InputError("Polygon: vertices do not form a convex polygon")
        # Every vertex must be on the inner side of every edge (convexity).
        if np.any(verts @ normals.T < -1e-12):
            raise InputError("Polygon: vertices do not form a convex polygon")
        self.ra = ra_a % 360.0
        self.dec = dec_a
        self._normals = normals
        self._centre = centre
        self._radius = float(np.degrees(np.arccos(np.clip((verts @ centre).min(), -1.0, 1.0))))

    def __repr__(self) -> str:
        return f"Polygon(ra={self.ra.tolist()!r}, dec={self.dec.tolist()!r})"

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Boolean mask of the positions (deg) inside or on the edges; NaN is outside."""
        return np.all(unit_vectors(ra, dec) @ self._normals.T >= 0.0, axis=-1)

    def padded(self, pad_arcsec: float) -> Polygon:
        """The polygon with every edge moved outward by at least ``pad_arcsec``.

        Works in the gnomonic projection about the vertex centroid, where the
        great-circle edges are straight lines: each line is shifted outward and
        adjacent lines are intersected. The shift is scaled by 1/cos^2 of the
        largest vertex distance so that the angular pad is never smaller than
        asked (it may be slightly larger towards the corners).
        """
        if pad_arcsec < 0 or not np.isfinite(pad_arcsec):
            raise InputError(f"Polygon.padded: pad_arcsec must be >= 0, got {pad_arcsec}")
        if pad_arcsec == 0:
            return self
        c = self._centre
        # Orthonormal tangent basis (e, n) at the centre.
        e = np.cross([0.0, 0.0, 1.0], c)
        if np.linalg.norm(e) < 1e-12:
            e = np.array([1.0, 0.0, 0.0])
        e /= np.linalg.norm(e)
        n = np.cross(c, e)
        verts = unit_vectors(self.ra, self.dec)
        if np.cross(verts[0], verts[1]) @ self._normals[0] < 0:
            verts = verts[::-1]
        z = verts @ c
        xy = np.stack([verts @ e, verts @ n], axis=1) / z[:, None]
        shift = math.radians(pad_arcsec / 3600.0) / math.cos(math.radians(self._radius)) ** 2
        a, b = xy, np.roll(xy, -1, axis=0)
        d = b - a
        # Inward normal of each edge (vertices are counter-clockwise seen from inside).
        inward = np.stack([-d[:, 1], d[:, 0]], axis=1) / np.linalg.norm(d, axis=1)[:, None]
        a = a - shift * inward
        # Vertex i is the intersection of edges i-1 and i.
        p0, d0 = np.roll(a, 1, axis=0), np.roll(d, 1, axis=0)
        p1, d1 = a, d
        cross = d0[:, 0] * d1[:, 1] - d0[:, 1] * d1[:, 0]
        t = ((p1 - p0)[:, 0] * d1[:, 1] - (p1 - p0)[:, 1] * d1[:, 0]) / cross
        new_xy = p0 + t[:, None] * d0
        v = c + new_xy[:, :1] * e + new_xy[:, 1:] * n
        v /= np.linalg.norm(v, axis=1)[:, None]
        return Polygon(
            np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360.0, np.degrees(np.arcsin(v[:, 2]))
        )

    def bounding_radius_deg(self) -> float:
        """Largest angle (deg) from the vertex centroid to a vertex."""
        return self._radius

    def _hpx_ranges(self, order: int) -> np.ndarray:
        # Counter-clockwise order as seen from inside is what HEALPix expects; pass
        # the vertices in the winding that makes normals point inward.
        ra, dec = self.ra, self.dec
        verts = unit_vectors(ra, dec)
        if np.cross(verts[0], verts[1]) @ self._normals[0] < 0:
            ra, dec = ra[::-1], dec[::-1]
        return np.asarray(
            hpgeom.query_polygon(
                hpgeom.order_to_nside(order),
                ra,
                dec,
                inclusive=True,
                nest=True,
                return_pixel_ranges=True,
            ),
            dtype=np.int64,
        ).reshape(-1, 2)
