"""The per-process bundle cache: read once while the budget holds, dropped per group."""

from __future__ import annotations

import pytest

from core.bundle import read_visit_info
from flows import detector as D
from tests.conftest import V0, make_config


@pytest.fixture(autouse=True)
def _empty_cache():
    D.forget_bundles()
    yield
    D.forget_bundles()


def _reads(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = D.read_detector_bundle

    def counting(root, visit, detector, **kw):
        calls.append(int(detector))
        return real(root, visit, detector, **kw)

    monkeypatch.setattr(D, "read_detector_bundle", counting)
    return calls


def test_bundles_are_read_once_while_they_fit_the_budget(survey_root, tmp_path, monkeypatch):
    info = read_visit_info(survey_root, V0)
    dets = list(info.detectors)
    config = make_config(tmp_path, bundle_cache_mb=1024)
    calls = _reads(monkeypatch)
    for _stage in range(3):  # three stages over the same group
        for d in dets:
            D.get_bundle(survey_root, info, d, config)
    assert calls == dets


def test_a_small_budget_keeps_only_what_fits(survey_root, tmp_path, monkeypatch):
    info = read_visit_info(survey_root, V0)
    dets = list(info.detectors)
    one = D.bundle_nbytes(D.get_bundle(survey_root, info, dets[0], make_config(tmp_path)))
    D.forget_bundles()
    # room for two bundles (256 px detectors: ~1 MB each), not for all of them
    config = make_config(tmp_path, bundle_cache_mb=max(1, (2 * one + one // 2) // 2**20))
    n_fit = config.orchestration.bundle_cache_mb * 2**20 // one
    assert 1 <= n_fit < len(dets)
    calls = _reads(monkeypatch)
    for d in dets:
        D.get_bundle(survey_root, info, d, config)
    for d in dets[-n_fit:]:  # the newest stay cached
        D.get_bundle(survey_root, info, d, config)
    assert calls == dets
    D.get_bundle(survey_root, info, dets[0], config)  # the oldest was evicted
    assert calls == [*dets, dets[0]]


def test_forget_drops_only_the_finished_group(survey_root, tmp_path, monkeypatch):
    info = read_visit_info(survey_root, V0)
    dets = list(info.detectors)
    config = make_config(tmp_path, bundle_cache_mb=1024)
    for d in dets:
        D.get_bundle(survey_root, info, d, config)
    D.forget_bundles(info.visit, dets[:2])
    calls = _reads(monkeypatch)
    for d in dets:
        D.get_bundle(survey_root, info, d, config)
    assert calls == dets[:2]
