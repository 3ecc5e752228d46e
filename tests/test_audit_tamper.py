"""`keyserver audit verify --db` on a tampered database: every tampering is a broken chain in one line and
exit 1, never "OK" and never a traceback (a cut tail reads as a chain that links, so the store's own head
record is the check)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from modelseal.cli.main import main
from modelseal.keyserver.store import open_store

TAMPERING = {
    "a cut tail": (
        "DELETE FROM audit WHERE seq = 4",
        "the log ends at entry 3, but the store's head record says entry 4",
    ),
    "every entry deleted": ("DELETE FROM audit", "the log ends at entry 0, but the store's head record says entry 4"),
    "the head record removed": ("DROP TABLE audit_head", "the store has no audit head record"),
    "text in seq": ("UPDATE audit SET seq = 'x' WHERE seq = 4", "entry 4 is malformed"),
    "text in ts_ms": ("UPDATE audit SET ts_ms = 'abc' WHERE seq = 2", "entry 2 is malformed"),
    "a BLOB entry": ("UPDATE audit SET entry = x'ff00' WHERE seq = 2", "entry 2 is malformed"),
    "a rewritten entry": ("UPDATE audit SET entry = '{}' WHERE seq = 3", "entry 3 was modified (hash mismatch)"),
}


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "ks.db"
    store = open_store(f"sqlite:///{path}")
    for i in range(4):
        with store.transaction() as tx:
            tx.append_audit({"event": "test", "i": i})
    store.close()
    return path


def verify(path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["keyserver", "audit", "verify", "--db", f"sqlite:///{path}"])
    return result.exit_code, result.output


def test_an_untouched_database_verifies(database: Path) -> None:
    code, output = verify(database)
    assert code == 0 and output.startswith("audit log OK: 4 entries, head 4:")


@pytest.mark.parametrize("how", TAMPERING, ids=str)
def test_each_tampering_is_one_broken_line(database: Path, how: str) -> None:
    sql, problem = TAMPERING[how]
    with sqlite3.connect(database) as conn:
        conn.execute(sql)
    code, output = verify(database)
    assert code == 1, output
    assert output.startswith(f"audit log BROKEN: {problem}") and output.count("\n") == 1, output
