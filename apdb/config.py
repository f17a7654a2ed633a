"""Configuration of an APDB connection (:class:`ApdbConfig`)."""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa
from pydantic import BaseModel, Field, SecretStr, model_validator

from core.errors import ConfigError

__all__ = ["ApdbConfig"]


class ApdbConfig(BaseModel, frozen=True, extra="forbid"):
    """Where the APDB lives and how to talk to it.

    The password never appears in a log, a repr or an artifact: it is a
    ``SecretStr`` or comes from the environment variable named by
    ``password_env`` at connection time; URLs are always rendered with the
    password hidden.
    """

    url: str = Field(
        "apdb.sqlite3",
        description=(
            "Database: a SQLite file path, a sqlite:/// URL, or a postgresql:// "
            "(psycopg 3) URL. Rubin: ApdbSqlConfig.db_url."
        ),
    )
    password: SecretStr | None = Field(
        None, description="PostgreSQL password; overrides the environment variable."
    )
    password_env: str = Field(
        "DIAPIPE_APDB_PASSWORD",
        description="Environment variable read for the PostgreSQL password when `password` is unset.",
    )
    auto_create: bool = Field(
        True,
        description=(
            "Create the tables when the database has none (the embedded default); "
            "set False in production so a wrong URL fails instead of making an empty APDB."
        ),
    )
    history_days: float = Field(
        360.0,
        gt=0,
        description=(
            "DiaSource/DiaForcedSource history read before a visit, in days. Rubin: "
            "ApdbSqlConfig.read_sources_months / read_forced_sources_months and "
            "DiaPipelineTask historyMonths (12 months = 360 days)."
        ),
    )
    healpix_order: int = Field(
        16,
        ge=4,
        le=29,
        description=(
            "HEALPix order (nest) of the spatial index column pixelId, used when a "
            "database is created; an existing database keeps its own. Rubin uses an "
            "HTM index instead: ApdbSqlConfig.htm_level."
        ),
    )
    max_pixel_ranges: int = Field(
        64,
        ge=1,
        description="Most pixel ranges in one region query. Rubin: ApdbSqlConfig.htm_max_ranges.",
    )
    pool_size: int = Field(5, ge=1, description="Connections kept open in the pool (PostgreSQL).")
    max_overflow: int = Field(
        10, ge=0, description="Extra connections allowed beyond pool_size (PostgreSQL)."
    )
    pool_timeout_s: float = Field(
        30.0, gt=0, description="Seconds to wait for a free pooled connection."
    )
    connect_timeout_s: int = Field(
        10,
        ge=1,
        description="Seconds to wait for a PostgreSQL connection. Rubin: ApdbSqlConfig.connection_timeout.",
    )
    sqlite_busy_timeout_ms: int = Field(
        60_000,
        ge=0,
        description="SQLite busy_timeout: how long a writer waits for the file lock (ms).",
    )

    @model_validator(mode="before")
    @classmethod
    def _move_password_out_of_url(cls, data):
        """A password written in the URL moves to ``password`` so the URL can be shown."""
        if isinstance(data, dict) and isinstance(data.get("url"), str) and "://" in data["url"]:
            try:
                url = sa.make_url(data["url"])
            except sa.exc.ArgumentError:
                return data
            if url.password is not None:
                data = dict(data)
                if data.get("password") is None:
                    data["password"] = SecretStr(str(url.password))
                data["url"] = url._replace(password=None).render_as_string(hide_password=False)
        return data

    def sqlalchemy_url(self) -> sa.URL:
        """The SQLAlchemy URL, with the password filled in (do not log it).

        Raises
        ------
        ConfigError
            If the URL names a database other than SQLite or PostgreSQL.
        """
        text = self.url
        if "://" not in text:
            text = "sqlite:///" + str(Path(text).expanduser().resolve())
        try:
            url = sa.make_url(text)
        except sa.exc.ArgumentError as exc:
            raise ConfigError(f"ApdbConfig.url: cannot parse {self.safe_url()!r}: {exc}") from exc
        backend = url.get_backend_name()
        if backend == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
            password = (
                self.password.get_secret_value()
                if self.password is not None
                else os.environ.get(self.password_env)
            )
            if password and url.password is None:
                url = url.set(password=password)
        elif backend != "sqlite":
            raise ConfigError(
                f"ApdbConfig.url: backend {backend!r} is not supported, use sqlite or postgresql"
            )
        return url

    def safe_url(self) -> str:
        """The URL with any password masked, for logs and messages."""
        try:
            return sa.make_url(self.url).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            return self.url if "@" not in self.url else "<unparseable URL>"
