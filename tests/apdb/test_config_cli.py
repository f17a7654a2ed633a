"""ApdbConfig (URLs, secrets) and the ``python -m apdb`` commands."""

from __future__ import annotations

import logging

import pytest

from apdb.__main__ import main
from apdb.config import ApdbConfig
from apdb.sql import ApdbSql
from core.errors import ConfigError
from tests.apdb.conftest import store_detector


def test_plain_path_is_a_sqlite_file(tmp_path):
    url = ApdbConfig(url=str(tmp_path / "a.sqlite3")).sqlalchemy_url()
    assert url.get_backend_name() == "sqlite"
    assert url.database == str(tmp_path / "a.sqlite3")


def test_postgresql_url_uses_psycopg_and_env_password(monkeypatch):
    monkeypatch.setenv("DIAPIPE_APDB_PASSWORD", "s3cret")
    config = ApdbConfig(url="postgresql://alert@db.example:5432/apdb")
    url = config.sqlalchemy_url()
    assert url.drivername == "postgresql+psycopg"
    assert url.password == "s3cret"
    assert "s3cret" not in config.safe_url()
    assert "s3cret" not in repr(config)


def test_password_in_url_is_masked(caplog):
    config = ApdbConfig(url="postgresql://alert:hunter2@127.0.0.1:1/apdb", connect_timeout_s=1)
    assert "hunter2" not in config.safe_url()
    assert "hunter2" not in repr(config)
    with caplog.at_level(logging.DEBUG), pytest.raises(Exception) as info:
        ApdbSql(config)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in caplog.text


def test_unsupported_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="'mysql' is not supported"):
        ApdbConfig(url="mysql://x@y/z").sqlalchemy_url()


def test_config_is_frozen_and_strict():
    with pytest.raises(ValueError, match="extra"):
        ApdbConfig(url="a.sqlite3", histroy_days=3)
    assert ApdbConfig().history_days == 360.0


def test_cli_create_info_visit(tmp_path, capsys):
    path = str(tmp_path / "cli.sqlite3")
    assert main(["create", path]) == 0
    with ApdbSql(ApdbConfig(url=path)) as db:
        store_detector(db, 77, 5, [1, 2, 3], 10.0, 10.0, 60000.0)
        store_detector(db, 77, 6, [4], 10.0, 10.0, 60000.0)
    capsys.readouterr()
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "version:schema" in out and "DiaSource" in out
    assert any(line.split() == ["DiaSource", "4"] for line in out.splitlines())
    assert main(["visit", path, "77"]) == 0
    out = capsys.readouterr().out
    assert "visit 77: 2 detector(s), 4 DiaSources" in out
    assert main(["cone", path, "10", "10", "0.01"]) == 0
    assert "4 DiaObject(s)" in capsys.readouterr().out


def test_cli_on_a_missing_database_fails_without_creating_it(tmp_path, capsys):
    path = tmp_path / "missing.sqlite3"
    assert main(["info", str(path)]) == 1
    assert "python -m apdb create" in capsys.readouterr().err
    assert not path.exists()
