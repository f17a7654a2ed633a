"""Operator mistakes and damaged files at the command lines: one clear line, never a traceback.

Also: ``alerts replay`` and ``alerts list`` go on past a damaged file and
report it; ``alerts list`` checks each alert file against the SHA-256 in its
receipt; implausible ``visit.json`` values are refused; a full disk on the
alert store names the file; missing object-store credentials name the URL
and the variables to set.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from alerts.__main__ import main as alerts_main
from alerts.packet import AlertBatch, package_alerts
from alerts.store import AlertStoreConfig, read_alert_batch, write_alerts_with_digest
from core.bundle import read_visit_info
from core.errors import AlertError, InputError
from flows.visit import main as visit_main
from sim.__main__ import main as sim_main
from tests.alerts.conftest import make_alert_inputs


def _one_error_line(err: str) -> None:
    assert "Traceback" not in err
    assert sum(line.startswith(("error:", "python -m")) for line in err.splitlines()) >= 1


def _batch(visit: int, detector: int) -> AlertBatch:
    bundle, new, objects, hist, forced = make_alert_inputs(seed=5, n_alerts=6, depth=2, forced=2)
    b = package_alerts(new, objects, hist, forced, {}, bundle.visit)
    return AlertBatch(b.payloads, b.dia_source_ids, b.schema, visit, detector)


@pytest.fixture
def alert_dir(tmp_path) -> Path:
    """Two good alert files with their receipts, as the produce stage writes them."""
    out = tmp_path / "alerts"
    for visit, det in ((0, 91), (0, 94)):
        b = _batch(visit, det)
        url, digest = write_alerts_with_digest(b, AlertStoreConfig(location=str(out)))
        (out / "receipts").mkdir(exist_ok=True)
        (out / "receipts" / f"{visit}_{det}.json").write_text(json.dumps({"sha256": digest}))
        assert digest == hashlib.sha256(Path(url).read_bytes()).hexdigest()
    return out


def test_list_reports_a_corrupt_file_and_lists_the_others(alert_dir, capsys):
    (alert_dir / "5_1.avro").write_bytes(b"not avro")
    assert alerts_main(["list", str(alert_dir)]) == 1
    out, err = capsys.readouterr()
    assert "0_91.avro" in out and "0_94.avro" in out
    assert "5_1.avro" in err and "not an Avro container" in err
    _one_error_line(err)


def test_list_detects_a_file_changed_after_its_receipt(alert_dir, capsys):
    assert alerts_main(["list", str(alert_dir)]) == 0
    capsys.readouterr()
    path = alert_dir / "0_94.avro"
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 2] = bytes(b ^ 0xFF for b in data[mid : mid + 2])  # still decodes
    path.write_bytes(bytes(data))
    assert alerts_main(["list", str(alert_dir)]) == 1
    out, err = capsys.readouterr()
    assert "0_94.avro: content differs from its receipt" in err
    assert "0_91.avro" in out and "0_91.avro" not in err


def test_replay_skips_a_corrupt_dead_letter_and_reports_it(alert_dir, tmp_path, capsys):
    dead = tmp_path / "dead"
    dead.mkdir()
    good = alert_dir / "0_91.avro"
    shutil.copy(good, dead / "0_91_20260101T000000000000_aaaa0001.avro")
    (dead / "0_92_20260101T000000000000_aaaa0003.avro").write_bytes(good.read_bytes()[:2000])
    port = _closed_port()
    rc = alerts_main(["replay", str(dead), "--servers", f"127.0.0.1:{port}", "--timeout", "1"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "0_92_" in err and "skipped" in err, err
    assert "1 unreadable file(s)" in out and f"of {_n(good)} alert(s)" in out, out
    assert (dead / "0_92_20260101T000000000000_aaaa0003.avro").exists(), "kept in place"


def _n(path) -> int:
    return len(read_alert_batch(str(path)))


def _closed_port() -> int:
    from tests.conftest import free_port

    return free_port()


@pytest.mark.parametrize("command", ["list", "replay"])
def test_a_mistyped_directory_is_an_error(command, tmp_path, capsys):
    assert alerts_main([command, str(tmp_path / "no-such-dir")]) == 2
    err = capsys.readouterr().err
    assert "no-such-dir: no such directory" in err
    _one_error_line(err)


def test_show_mistakes_are_one_line(alert_dir, tmp_path, capsys):
    assert alerts_main(["show", str(alert_dir)]) == 2
    assert "is a directory" in capsys.readouterr().err
    png = tmp_path / "no" / "dir" / "x.png"
    assert alerts_main(["show", str(alert_dir / "0_91.avro"), "--png", str(png)]) == 2
    err = capsys.readouterr().err
    assert "No such file or directory" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--detectors", "abc"],
        ["--detectors", "91,,94"],
        ["--detectors-per-task", "0"],
    ],
    ids=["letters", "empty item", "zero group size"],
)
def test_visit_cli_mistakes_are_argparse_errors(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        visit_main(["--root", str(tmp_path), "--visit", "0", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "python -m flows.visit: error: argument" in err
    _one_error_line(err)


@pytest.mark.parametrize(
    ("visit", "message"),
    [
        ("2", "visit 2 is not an LSSTCam visit number day_obs·10⁵ + seq_num"),
        ("2025112100001", "has no exposure 1 on night 20251121"),
    ],
    ids=["small counter", "night without a visit"],
)
def test_visit_cli_simulation_takes_lsstcam_visit_numbers(visit, message, tmp_path, capsys):
    """Without --root, --visit names one of the simulated visits by its LSSTCam number."""
    with pytest.raises(SystemExit) as info:
        visit_main(["--visit", visit, "--workdir", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "python -m flows.visit: error: --visit:" in err and message in err, err
    _one_error_line(err)
    assert not (tmp_path / "bundles").exists(), "refused before simulating anything"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--detectors", "0"], "n_detectors: Input should be greater than or equal to 1"),
        (["--detectors", "5000"], "n_detectors: Input should be less than or equal to 189"),
        (["--sources-per-detector", "-5"], "sources_per_detector"),
        (["--bogus-fraction", "2"], "bogus_fraction"),
    ],
    ids=["0 detectors", "5000 detectors", "negative sources", "fraction 2"],
)
def test_sim_cli_mistakes_are_one_line(argv, message, tmp_path, capsys):
    assert sim_main(["--out", str(tmp_path / "o"), "--visits", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert f"python -m sim: error: {message}" in err
    _one_error_line(err)


def test_sim_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert sim_main(["--out", str(f), "--visits", "1", "--detectors", "1"]) == 2
    assert "Not a directory" in capsys.readouterr().err


def _visit_json(tmp_path, **change) -> str:
    info = {
        "visit": 7,
        "band": "r",
        "midpointMjdTai": 61000.0,
        "exposureTime": 30.0,
        "boresightRa": 10.0,
        "boresightDec": -20.0,
        "rotAngle": 0.0,
        "observation_reason": "survey",
        "target_name": "field",
        "detectors": [1, 2],
        **change,
    }
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "visit.json").write_text(json.dumps(info))
    return str(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"midpointMjdTai": 1e9}, "midpointMjdTai 1000000000.0 is outside the plausible range"),
        ({"midpointMjdTai": -5e5}, "midpointMjdTai -500000.0 is outside"),
        ({"detectors": []}, "detectors is empty"),
    ],
    ids=["MJD 1e9", "MJD -5e5", "no detectors"],
)
def test_implausible_visit_json_is_refused(change, message, tmp_path):
    with pytest.raises(InputError, match=message):
        read_visit_info(_visit_json(tmp_path, **change), 7)


def test_disk_full_on_the_alert_store_names_the_file(tmp_path, monkeypatch):
    import alerts.store as store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", full)
    with pytest.raises(AlertError, match=r"0_91\.avro: cannot write: No space left on device"):
        write_alerts_with_digest(_batch(0, 91), AlertStoreConfig(location=str(tmp_path / "a")))
    assert not any((tmp_path / "a").iterdir()), "nothing left under the final or a temporary name"


def test_s3_without_credentials_names_the_url_and_variables(moto_s3_port, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", f"http://127.0.0.1:{moto_s3_port}")
    import fsspec

    fsspec.config.conf.setdefault("s3", {})["skip_instance_cache"] = True
    try:
        with pytest.raises(InputError) as info:
            read_visit_info("s3://no-creds-bucket/root", 0)
    finally:
        fsspec.config.conf["s3"].pop("skip_instance_cache", None)
    text = str(info.value)
    assert "s3://no-creds-bucket/root/0/visit.json" in text or "no-creds-bucket/root/0" in text
    assert "AWS_ACCESS_KEY_ID" in text and "AWS_SECRET_ACCESS_KEY" in text
