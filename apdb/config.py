"""Configuration of an APDB connection (:class:`ApdbConfig`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

import sqlalchemy as sa
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

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
    sqlite_mmap_mb: int = Field(
        0,
        ge=0,
        description=(
            "SQLite mmap_size (MiB; 0 = off): how much of the file is read through a memory "
            "map instead of read() into SQLite's page cache (SQLite caps it at its "
            "compile-time SQLITE_MAX_MMAP_SIZE, 2 GiB by default). Every mapped page a "
            "process touches counts in its resident set: with 2048, a 189-detector visit on "
            "a 2 GB APDB held 5.7 GiB instead of 4.0, for no load time measurable on "
            "this machine (bench/RESULTS.md 'visit')."
        ),
    )
    lock_timeout_ms: int = Field(
        60_000,
        ge=0,
        description=(
            "PostgreSQL lock_timeout: how long a statement waits for a table or row lock "
            "held by another session (a CREATE INDEX, VACUUM FULL, an idle transaction) "
            "before it fails with a TransientError and is retried (ms; 0 = wait for ever)."
        ),
    )
    statement_timeout_ms: int = Field(
        600_000,
        ge=0,
        description=(
            "PostgreSQL statement_timeout: longest a single statement may run (ms; "
            "0 = no limit); a statement cut off raises a TransientError."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _move_password_out_of_url(cls, data):
        """A password written in the URL moves to ``password`` so the URL can be shown.

        Both libpq forms are taken out: ``user:password@host`` (the password may
        hold unencoded ``@``, ``:`` or ``/``: the user part ends at the last
        ``@``) and ``?password=``. A URL that cannot be split is replaced by a
        placeholder, as it may hold a secret. This never raises: pydantic would
        print the raw input beside the error.
        """
        if isinstance(data, dict) and isinstance(data.get("url"), str):
            url, password = split_password(data["url"])
            if url != data["url"] or password is not None:
                data = dict(data)
                data["url"] = url
                if password is not None and data.get("password") is None:
                    data["password"] = SecretStr(password)
        return data

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        """Refuse URLs that cannot be parsed, or that carry secrets other than the password.

        The URL checked here has no password any more (see
        :meth:`_move_password_out_of_url`), so the messages may show it.
        """
        if url == _UNPARSEABLE:
            raise ValueError(
                "ApdbConfig.url cannot be parsed as a path or a database URL; it is not "
                "shown because it may hold a password"
            )
        if "://" not in url:
            return url
        secrets = sorted(k for k, _ in _query_items(url) if _is_secret_query_key(k))
        if secrets:
            raise ValueError(
                f"ApdbConfig.url {url!r}: the query parameter(s) {secrets} hold secrets that "
                f"would show wherever the URL is shown; give them in the environment "
                f"(libpq reads PGSSLPASSWORD, ...)"
            )
        try:
            sa.make_url(url)
        except Exception as exc:  # every parse failure is a config error
            raise ValueError(
                f"ApdbConfig.url {url!r} is not a valid database URL "
                f"({type(exc).__name__}: {_reason(exc, url)})"
            ) from None
        return url

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
        except Exception as exc:  # every parse failure is a config error
            raise ConfigError(
                f"ApdbConfig.url: cannot parse {self.safe_url()!r} "
                f"({type(exc).__name__}: {_reason(exc, text)})"
            ) from None
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
        url, password = split_password(self.url)
        if password is None or url == _UNPARSEABLE:
            return url
        scheme, rest = url.split("://", 1)
        user, at, host = rest.rpartition("@")
        return f"{scheme}://{user}:***@{host}" if at else f"{scheme}://***@{rest}"


_UNPARSEABLE = "<unparseable URL, not shown>"
_SECRET_WORDS = ("password", "secret", "token", "passfile", "sslkey")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def _is_secret_query_key(key: str) -> bool:
    return any(w in key.lower() for w in _SECRET_WORDS)


def _query_items(url: str) -> list[tuple[str, str]]:
    """The raw ``key=value`` pairs of a URL's query (after the user part)."""
    rest = url.split("://", 1)[1]
    host = rest.rpartition("@")[2]
    query = host.partition("?")[2]
    out = []
    for piece in query.split("&") if query else ():
        key, _, value = piece.partition("=")
        out.append((unquote(key), value))
    return out


def _reason(exc: Exception, url: str) -> str:
    """An exception's message with the URL it may quote left out."""
    text = str(exc)
    return "cannot parse the URL" if url in text else text


def split_password(text: str) -> tuple[str, str | None]:
    """``(url without any password, the password or None)``; never raises.

    The password is taken from ``user:password@`` — the user part ends at the
    *last* ``@`` before the host, so unencoded ``@``, ``:`` and ``/`` in the
    password are kept in it — and from a ``password=`` query parameter (libpq
    accepts both); other secret query parameters (``sslpassword``, ...) are
    masked as ``***``. A plain path is returned as it is, unless it looks like
    a broken URL or a libpq ``key=value`` string with a password: then the
    placeholder ``<unparseable URL, not shown>`` is returned.
    """
    if "://" not in text:
        if re.search(r"password\s*=", text, re.IGNORECASE) or (
            "@" in text and _SCHEME.match(text) and not re.match(r"^[A-Za-z]:[\\/]", text)
        ):
            return _UNPARSEABLE, None
        return text, None
    scheme, rest = text.split("://", 1)
    password: str | None = None
    userinfo, at, host = rest.rpartition("@")
    if at:
        user, colon, pw = userinfo.partition(":")
        if colon:
            password = unquote(pw)
            rest = f"{user}@{host}"
    else:
        host = rest
    base, q, query = host.partition("?")
    if q:
        kept = []
        for piece in query.split("&"):
            key, eq, value = piece.partition("=")
            name = unquote(key)
            if name == "password":
                if password is None:
                    password = unquote(value)
                continue
            kept.append(f"{key}=***" if eq and _is_secret_query_key(name) else piece)
        host = base + ("?" + "&".join(kept) if kept else "")
        rest = f"{rest.rpartition('@')[0]}@{host}" if at else host
    return f"{scheme}://{rest}", password
