"""The completion marker: a bundle copied file by file is complete only when all of it is there."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from core.completion import COMPLETE_FILE, check_complete, mark_complete
from core.errors import InputError
from tests.conftest import V1


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def source(survey_root, tmp_path) -> Path:
    """A private copy of visit V1 of the session survey, with its marker."""
    src = tmp_path / "src"
    shutil.copytree(Path(survey_root) / str(V1), src / str(V1))
    mark_complete(str(src), V1)
    return src


def test_marker_lists_every_file_with_its_size(source):
    marker = json.loads((source / str(V1) / COMPLETE_FILE).read_text())
    files = {
        str(p.relative_to(source / str(V1))): p.stat().st_size for p in _files(source / str(V1))
    }
    files.pop(COMPLETE_FILE)
    assert marker == {"visit": V1, "files": files}
    assert "visit.json" in files and any(k.endswith("/difference.fits") for k in files)


def test_a_copy_in_any_order_is_complete_only_after_its_last_byte(source, tmp_path):
    """Marker first (a sync tool's order), then every file, the last one in two halves."""
    dst = tmp_path / "dst"
    order = [source / str(V1) / COMPLETE_FILE] + [
        p for p in _files(source / str(V1)) if p.name != COMPLETE_FILE
    ]
    assert check_complete(str(dst), V1) is None, "nothing there"
    for p in order[:-1]:
        target = dst / p.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
        assert check_complete(str(dst), V1) is None, f"incomplete after {target.name}"
    last = order[-1]
    target = dst / last.relative_to(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = last.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    assert check_complete(str(dst), V1) is None, "half of the last file"
    target.write_bytes(data)
    os.utime(target, (2_000_000_000, 2_000_000_000))
    done = check_complete(str(dst), V1)
    assert done is not None and done.visit == V1
    assert done.completed_at.timestamp() == 2_000_000_000, "the latest file's mtime"


def test_without_a_marker_a_full_folder_is_not_complete(survey_root):
    assert check_complete(survey_root, 0) is None


def test_a_marker_mid_write_is_not_complete(source):
    marker = source / str(V1) / COMPLETE_FILE
    marker.write_bytes(marker.read_bytes()[:40])
    assert check_complete(str(source), V1) is None


def test_a_marker_written_before_the_bundle_is_an_error(source):
    """A producer that marked the folder when it held only visit.json broke the contract."""
    body = (source / str(V1) / "visit.json").read_bytes()
    (source / str(V1) / COMPLETE_FILE).write_text(
        json.dumps({"visit": V1, "files": {"visit.json": len(body)}})
    )
    with pytest.raises(InputError, match=r"does not list 16 file\(s\) of the detectors"):
        check_complete(str(source), V1)


@pytest.mark.parametrize(
    "body",
    [{"visit": 2, "files": {}}, {"visit": V1}, {"visit": V1, "files": {"visit.json": -1}}],
    ids=["other-visit", "no-files", "negative-size"],
)
def test_a_marker_of_the_wrong_shape_is_an_error(source, body):
    (source / str(V1) / COMPLETE_FILE).write_text(json.dumps(body))
    with pytest.raises(InputError, match="complete.json: expected"):
        check_complete(str(source), V1)


@pytest.mark.s3
def test_on_s3_an_object_missing_then_present(source, moto_s3_port, monkeypatch):
    import fsspec
    import s3fs

    endpoint = f"http://127.0.0.1:{moto_s3_port}"
    monkeypatch.setitem(fsspec.config.conf.setdefault("s3", {}), "endpoint_url", endpoint)
    bucket = f"bundles-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir(bucket)
    root = f"s3://{bucket}/lsstcam"
    files = _files(source / str(V1))
    held = next(p for p in files if p.name == "template.fits")
    for p in files:
        if p != held:
            fs.put_file(str(p), f"{bucket}/lsstcam/{p.relative_to(source)}")
    fsspec.filesystem("s3").invalidate_cache()
    assert check_complete(root, V1) is None, "one detector image not uploaded yet"
    fs.put_file(str(held), f"{bucket}/lsstcam/{held.relative_to(source)}")
    fsspec.filesystem("s3").invalidate_cache()
    done = check_complete(root, V1)
    assert done is not None and set(done.files) == {
        str(p.relative_to(source / str(V1))) for p in files if p.name != COMPLETE_FILE
    }
