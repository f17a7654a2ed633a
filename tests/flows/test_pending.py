"""The cron backstop waits for bundles delivered under the completion contract."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.completion import mark_complete
from core.nextvisit import NEXT_VISIT_FILE
from flows.pending import find_pending_visits
from tests.conftest import V0, V1, V2, make_config


def test_pending_skips_a_bundle_still_arriving(survey_root, tmp_path):
    root = tmp_path / "bundles"
    for v in (V0, V1, V2):
        shutil.copytree(Path(survey_root) / str(v), root / str(v))
    config = make_config(tmp_path, cache=False)
    # 0: no next-visit file, no marker: taken as it is
    # 1: announced, bundle copied, no marker yet
    (root / str(V1) / NEXT_VISIT_FILE).write_text("{}")
    # 2: marked complete, then a file cut short (still being copied)
    mark_complete(str(root), V2)
    image = next((root / str(V2)).glob("*/template.fits"))
    data = image.read_bytes()
    image.write_bytes(data[:2880])
    assert find_pending_visits(str(root), config) == [V0]

    mark_complete(str(root), V1)
    image.write_bytes(data)
    assert find_pending_visits(str(root), config) == [V0, V1, V2]
