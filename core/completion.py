"""When a visit bundle is complete: the producer's marker, checked against the files.

A bundle is copied into place file by file (a camera writer, ``aws s3 sync``,
``rsync``), so a visit folder can be seen with some detectors missing or a
file half written. The contract for whoever writes bundles:

1. write every file of the visit (``visit.json``, each detector's four files,
   anything else);
2. then write ``{root}/{visit}/complete.json`` (:data:`COMPLETE_FILE`), which
   lists every file of the visit with its size in bytes::

       {"visit": 123, "files": {"visit.json": 512, "94/difference.fits": 3153600, ...}}

   :func:`mark_complete` writes it from what is on the storage.

The visit is *complete* (:func:`check_complete`) when the marker is there and
valid, it lists ``visit.json`` and the four bundle files of every detector
``visit.json`` names, and every listed file exists with exactly the listed
size. The sizes make the check hold even when the marker itself lands before
the files (a sync tool copies in any order) or a local file is still being
written; an object store only shows an object once its upload is finished.
The visit completed when the last of those files (the marker included) was
last modified: :attr:`Completion.completed_at`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import fsspec

from core.bundle import IMAGE_KINDS, read_visit_info, visit_path
from core.errors import InputError

__all__ = ["COMPLETE_FILE", "Completion", "check_complete", "mark_complete"]

#: The completion marker, written last: ``{root}/{visit}/complete.json``.
COMPLETE_FILE = "complete.json"

#: Files of a visit folder that the marker does not cover: itself and the
#: next-visit message, which arrives before the bundle and may be re-sent.
_NOT_BUNDLE = (COMPLETE_FILE, "next-visit.json")


@dataclass(frozen=True)
class Completion:
    """A complete visit: its files, and when the last of them landed (UTC)."""

    visit: int
    files: dict[str, int]
    completed_at: datetime


def _mtime(info: dict) -> datetime | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, datetime):
            return v if v.tzinfo else v.replace(tzinfo=UTC)
        if isinstance(v, (int, float)):
            return datetime.fromtimestamp(float(v), UTC)
        if isinstance(v, str):
            try:
                t = datetime.fromisoformat(v)
            except ValueError:
                continue
            return t if t.tzinfo else t.replace(tzinfo=UTC)
    return None


def _listing(root: str, visit: int, storage_options: dict | None = None) -> dict[str, dict]:
    """Relative path → fsspec info of every file under the visit folder (one recursive listing)."""
    base = visit_path(root, visit)
    fs, path = fsspec.core.url_to_fs(base, **(storage_options or {}))
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    prefix = path.rstrip("/") + "/"
    return {
        name[len(prefix) :]: info
        for name, info in found.items()
        if name.startswith(prefix) and info.get("type", "file") == "file"
    }


def mark_complete(root: str, visit: int, storage_options: dict | None = None) -> str:
    """Write the visit's marker from the files now under ``{root}/{visit}``; returns its URL.

    Call it after the last file of the visit is written.
    """
    files = {
        rel: int(info["size"])
        for rel, info in sorted(_listing(root, visit, storage_options).items())
        if rel not in _NOT_BUNDLE
    }
    url = f"{visit_path(root, visit)}/{COMPLETE_FILE}"
    body = json.dumps({"visit": int(visit), "files": files}, indent=1, sort_keys=True) + "\n"
    with fsspec.open(url, "wb", **(storage_options or {})) as f:
        f.write(body.encode())
    return url


def check_complete(root: str, visit: int, storage_options: dict | None = None) -> Completion | None:
    """The visit's :class:`Completion` when its bundle is complete, else None.

    Not complete: no marker yet, a marker that is not (yet) valid JSON, or a
    listed file missing or of another size.

    Raises
    ------
    InputError
        The marker is JSON but not ``{"visit": int, "files": {path: size}}`` naming
        this visit, it does not list ``visit.json`` or a file of a detector that
        ``visit.json`` names, or ``visit.json`` is invalid: the producer broke the
        contract, and waiting will not help until it writes the marker again.
    """
    listing = _listing(root, visit, storage_options)
    if COMPLETE_FILE not in listing:
        return None
    url = f"{visit_path(root, visit)}/{COMPLETE_FILE}"
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        raw = f.read()
    try:
        marker = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        # a local marker caught while it is written reads as truncated JSON
        return None
    files = marker.get("files") if isinstance(marker, dict) else None
    if (
        not isinstance(files, dict)
        or marker.get("visit") != int(visit)
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in files.values()
        )
    ):
        raise InputError(
            f'{url}: expected {{"visit": {int(visit)}, "files": {{path: size in bytes}}}}, '
            f"got {raw[:200]!r}"
        )
    for rel, size in files.items():
        info = listing.get(rel)
        if info is None or int(info.get("size", -1)) != size:
            return None
    if "visit.json" not in files:
        raise InputError(f"{url}: does not list visit.json")
    visit_info = read_visit_info(root, visit)
    need = [f"{d}/{n}" for d in visit_info.detectors for n in ("diaSources.parquet",)]
    need += [f"{d}/{k}.fits" for d in visit_info.detectors for k in IMAGE_KINDS]
    unlisted = [n for n in need if n not in files]
    if unlisted:
        raise InputError(
            f"{url}: does not list {len(unlisted)} file(s) of the detectors in visit.json, "
            f"e.g. {unlisted[0]}: the marker was written before the bundle was"
        )
    times = [t for t in (_mtime(listing[r]) for r in (*files, COMPLETE_FILE)) if t is not None]
    completed = max(times) if times else datetime.now(UTC)
    return Completion(visit=int(visit), files=dict(files), completed_at=completed)
