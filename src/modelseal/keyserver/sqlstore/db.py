"""Database engines for the key service: SQLite (embedded default) or PostgreSQL (several replicas).

Every state change runs in one transaction that first locks the audit-log head row, so decisions and
their audit records commit together and concurrent replicas serialise on it (``SELECT ... FOR
UPDATE`` on PostgreSQL; SQLite takes its write lock at ``BEGIN IMMEDIATE``). SQLite runs in WAL mode
with ``synchronous=FULL``: a committed grant survives a crash of the process or of the machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from modelseal.errors import UsageError

MIGRATIONS = Path(__file__).with_name("migrations")


# The drivers the service's transaction discipline was built and tested on, by URL scheme (any case).
_DRIVERS = {"sqlite": "sqlite", "sqlite+pysqlite": "sqlite", "postgresql": "postgresql+psycopg",
            "postgres": "postgresql+psycopg", "postgresql+psycopg": "postgresql+psycopg"}  # fmt: skip


def normalise_url(url: str) -> str:
    """Accept ``sqlite:///path``, a bare path, ``postgresql://...`` (scheme in any case); pick the psycopg 3
    driver. Other drivers are refused: the locking the audit chain relies on was only proven on these."""
    if "://" not in url:
        url = f"sqlite:///{Path(url).absolute()}"
    scheme, rest = url.split("://", 1)
    driver = _DRIVERS.get(scheme.lower())
    if driver is None:
        raise UsageError(
            f"unsupported database URL scheme {scheme[:40]!r}: use sqlite:///PATH or postgresql://HOST/DB "
            "(the key service runs SQLite or PostgreSQL through psycopg 3)"
        )
    url = f"{driver}://{rest}"
    try:
        make_url(url)
    except ArgumentError:
        raise UsageError("not a database URL (expected sqlite:///PATH or postgresql://HOST/DB)") from None
    return url


def connect(url: str) -> Engine:
    """An engine configured for the service's transaction discipline (see module docstring)."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"isolation_level": None, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    else:
        engine = create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)
    return engine


def first_line(exc: BaseException | None) -> str:
    """A driver's message (psycopg's run to several lines, with hints) as one line."""
    return (str(exc).splitlines() or ["unknown error"])[0]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=30000"):
        cur.execute(f"PRAGMA {pragma}")
    cur.close()


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


MIGRATION_LOCK = 0x6D6F64656C736561  # "modelsea": the PostgreSQL advisory lock every migration takes


def migrate(engine: Engine) -> str:
    """Bring the schema to the newest revision; return it. On PostgreSQL the migration holds an advisory
    lock for its transaction: replicas (or workers) that start together wait for the first, then find the
    schema current, instead of racing to create the same tables."""
    cfg = _alembic_config()
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # replicas starting together migrate one at a time
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except OperationalError as exc:
        raise UsageError(f"cannot migrate the key-service database: {first_line(exc.orig)}") from None
    return ScriptDirectory.from_config(cfg).get_current_head() or ""


def revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None: no schema yet)."""
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise UsageError(f"cannot open the key-service database: {first_line(exc.orig)}") from None


def check_current(engine: Engine) -> None:
    """Refuse to serve on a database whose schema is not at the newest revision."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    current = revision(engine)
    if current != head:
        raise UsageError(
            f"the key-service database is at schema revision {current or 'none'}, this version needs {head}: "
            "run `modelseal keyserver migrate` (back up the database first)"
        )
