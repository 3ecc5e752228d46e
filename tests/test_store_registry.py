"""A key-service store is one module plus one registration: a backend installed from outside the package,
named by its URL scheme, runs the service's decisions; unknown and broken backends get one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelseal.errors import UsageError
from modelseal.keyserver.store import open_store, url_scheme

from .test_keyservice_decisions import host, make_rig

TOY_MODULE = """
from modelseal.keyserver.memstore import MemoryStore

OPENED = []


class ToyStore(MemoryStore):
    def describe(self) -> str:
        return "toy"


def open_toy(url: str, migrate: bool) -> ToyStore:
    OPENED.append((url, migrate))
    return ToyStore()


def broken(url: str, migrate: bool):
    raise AssertionError("never called")
"""


def install(root: Path, entry_points: str) -> None:
    """What ``pip install toystore`` would leave: a module and a dist-info naming it in the stores group."""
    (root / "toystore.py").write_text(TOY_MODULE)
    info = root / "toystore-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toystore\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[modelseal.keyserver.stores]\n{entry_points}\n")


@pytest.fixture
def plugin_path(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("toystore", None)


def test_a_store_installed_from_outside_runs_the_service(plugin_path: Path) -> None:
    install(plugin_path, "toy = toystore:open_toy")
    store = open_store("toy://anywhere", migrate=True)
    assert store.describe() == "toy"
    assert sys.modules["toystore"].OPENED == [("toy://anywhere", True)]
    rig = make_rig(store, plugin_path)
    a = host("a")
    rig.grant(a.spki)
    lease, dek = rig.release(a)
    assert dek == rig.dek and lease.host == a.spki
    last = rig.events()[-1]
    assert (last["event"], last["decision"], last["host"]) == ("release", "ok", a.spki)


def test_unknown_and_broken_backends_are_one_line_errors(plugin_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no key-service store for mongodb:// database URLs \(known: sqlite, "):
        open_store("mongodb://db/x")
    install(plugin_path, "toy = toystore:open_toy\nbad = toystore:missing")
    with pytest.raises(UsageError, match=r"known: sqlite, postgresql, postgres, bad, toy\)"):
        open_store("nosuch://x")
    with pytest.raises(UsageError, match=r"store plugin bad \(toystore:missing\) cannot be loaded") as refused:
        open_store("bad://x")
    assert "\n" not in str(refused.value)


def test_url_schemes() -> None:
    assert url_scheme("keyserver.db") == "sqlite"  # a bare path is an SQLite file
    assert url_scheme("sqlite:///tmp/ks.db") == "sqlite"
    assert url_scheme("postgresql+psycopg://h/db") == "postgresql"
    assert url_scheme("PostgreSQL://h/db") == "postgresql"


def test_the_built_in_sql_store_opens_by_url(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'ks.db'}")
    try:
        assert store.describe() == "sqlite" and len(store.schema_revision()) >= 4
    finally:
        store.close()


def test_two_installed_stores_for_one_scheme_are_refused_naming_both(plugin_path: Path) -> None:
    install(plugin_path, "toy = toystore:open_toy")
    other = plugin_path / "othertoy-0.dist-info"
    other.mkdir()
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: othertoy\nVersion: 0\n")
    (other / "entry_points.txt").write_text("[modelseal.keyserver.stores]\ntoy = othertoy:open_store\n")
    with pytest.raises(UsageError) as refused:
        open_store("toy://anywhere")
    message = str(refused.value)
    assert "toystore:open_toy of toystore" in message and "othertoy:open_store of othertoy" in message
    assert "toystore" not in sys.modules  # neither was imported, let alone opened


def test_a_plugin_import_error_is_one_line_with_its_type(plugin_path: Path) -> None:
    install(plugin_path, "worse = toystore_raises:open_store")
    (plugin_path / "toystore_raises.py").write_text('raise RuntimeError("no driver\\n  second line")\n')
    try:
        with pytest.raises(UsageError) as refused:
            open_store("worse://x")
    finally:
        sys.modules.pop("toystore_raises", None)
    assert str(refused.value).endswith("cannot be loaded: RuntimeError: no driver")


@pytest.mark.parametrize(
    "url", ["sqlite+foo:///x.db", "postgresql+asyncpg://h/db"], ids=lambda u: u.split(":")[0]
)
def test_a_driver_the_service_was_not_built_on_is_one_line(url: str) -> None:
    with pytest.raises(UsageError, match=r"^unsupported database URL scheme .*through psycopg 3\)$") as refused:
        open_store(url)
    assert "\n" not in str(refused.value)


def test_an_unreachable_postgresql_is_one_line() -> None:
    with pytest.raises(UsageError, match=r"^cannot migrate the key-service database: .*Connection refused$") as r:
        open_store("postgresql://127.0.0.1:1/db")  # psycopg's message has a hint on a second line
    assert "\n" not in str(r.value)


def test_the_scheme_is_read_in_any_case_with_the_sqlite_discipline(tmp_path: Path) -> None:
    """``SQLITE://`` used to reach SQLAlchemy as a dialect name it has not (a traceback)."""
    from modelseal.keyserver.sqlstore.store import SqlStore

    store = open_store(f"SQLITE:///{tmp_path / 'ks.db'}")
    try:
        assert isinstance(store, SqlStore)
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.close()
