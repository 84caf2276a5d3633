"""The ledger across processes: restarts, exits without close(), concurrent appends, fork, kill."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import budgetguard.ledger as ledger_module
from budgetguard.ledger import Ledger, LedgerRecord, MemorySink, SQLiteSink, open_ledger

REPO = Path(ledger_module.__file__).resolve().parents[1]

WRITER = textwrap.dedent(
    """
    import sys
    from budgetguard.ledger import Ledger, LedgerRecord

    path, tag, count, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ledger = Ledger(path if path != "-" else None, batch_size=batch)
    for i in range(count):
        ledger.record(LedgerRecord(
            ts=1793491200.0 + i, run_id=f"{tag}-{i}", root_run_id=f"{tag}-root", parent_run_id=None,
            scope={"user_id": tag}, tags=("it",), metadata={"i": i}, model_requested="m", model_used="m",
            policy=None, outcome="ok", estimated_input_tokens=12, estimated_output_tokens=8, input_tokens=10,
            output_tokens=5, cached_input_tokens=0, reasoning_tokens=0, cost_usd=0.001, reserved_usd=0.002,
            latency_s=0.1, budgets=("b",)))
    if len(sys.argv) > 5 and sys.argv[5] == "hang":
        print("recorded", flush=True)
        import time
        time.sleep(60)  # killed here: every record() that returned must be in the file
    # exit normally WITHOUT ledger.close()
    """
)

READER = textwrap.dedent(
    """
    import json, sys
    from budgetguard.ledger import open_ledger

    ledger = open_ledger(sys.argv[1])
    print(json.dumps([r.to_dict() for r in ledger.totals(by="user")]))
    """
)


def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("name", ["ledger.sqlite3", "ledger.jsonl"])
def test_records_survive_an_exit_without_close_and_a_restart(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    # a batch size larger than the count: each record is its own write, none waits for exit
    run_python(WRITER, str(path), "alice", "700", "100000")
    run_python(WRITER, str(path), "bob", "300", "100000")  # a second run appends to the same file
    from_other_process = json.loads(run_python(READER, str(path)).stdout)
    with open_ledger(path) as ledger:
        here = [r.to_dict() for r in ledger.totals(by="user")]
        records = list(ledger.records())
    assert here == from_other_process
    assert [(r["user"], r["calls"], r["input_tokens"]) for r in here] == [("alice", 700, 7000), ("bob", 300, 3000)]
    assert sum(r["cost_usd"] for r in here) == pytest.approx(1.0)
    assert len({r.run_id for r in records}) == 1000
    assert records[0].metadata == {"i": 0} and records[0].tags == ("it",)


def test_default_path_comes_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "env" / "ledger.sqlite3"
    run_python(WRITER, "-", "carol", "5", "2", env={"BUDGETGUARD_LEDGER": str(path)})
    with open_ledger(path) as ledger:
        assert ledger.totals()[0].calls == 5


def test_concurrent_processes_append_to_one_sqlite_file_without_loss(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"  # does not exist yet: the writers also race to create it
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), f"p{n}", "1500", "25"], env=env, stderr=subprocess.PIPE
        )
        for n in range(4)
    ]
    for proc in writers:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()
    with open_ledger(path) as ledger:
        rows = ledger.totals(by="user")
        ids = [r.run_id for r in ledger.records()]
    assert [(r["user"], r.calls) for r in rows] == [(f"p{n}", 1500) for n in range(4)]
    assert len(ids) == len(set(ids)) == 6000
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize("name", ["killed.sqlite3", "killed.jsonl"])
def test_killed_process_keeps_every_record_it_recorded(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "dave", "449", "50", "hang"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "recorded"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with open_ledger(path) as ledger:
        assert ledger.totals()[0].calls == 449
    if name.endswith(".sqlite3"):
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_does_not_rewrite_parent_records(tmp_path: Path) -> None:
    path = tmp_path / "fork.sqlite3"
    ledger = Ledger(SQLiteSink(path), batch_size=10_000)
    base = LedgerRecord.from_dict({"ts": 1793491200.0, "run_id": "parent-0", "outcome": "ok"})
    ledger.record(base)  # stored before we fork
    pid = os.fork()
    if pid == 0:  # child: it gets its own connection and writes only its own record
        code = 0
        try:
            ledger.record(LedgerRecord.from_dict({"ts": 1793491201.0, "run_id": "child-0", "outcome": "ok"}))
            ledger.close()
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ledger.close()
    with open_ledger(path) as reader:
        assert sorted(r.run_id for r in reader.records()) == ["child-0", "parent-0"]


def test_interpreter_exit_flushes_every_open_ledger(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from budgetguard.ledger import Ledger, LedgerRecord
        a = Ledger(sys.argv[1])
        b = Ledger(sys.argv[2])
        for led, name in ((a, "a"), (b, "b")):
            led.record(LedgerRecord.from_dict({"ts": 1.0, "run_id": name, "outcome": "ok"}))
        """
    )
    run_python(code, str(tmp_path / "a.sqlite3"), str(tmp_path / "b.jsonl"))
    for name in ("a.sqlite3", "b.jsonl"):
        with open_ledger(tmp_path / name) as ledger:
            assert ledger.totals()[0].calls == 1


def test_close_is_quick_when_idle() -> None:
    ledger = Ledger(MemorySink())
    ledger.record(LedgerRecord.from_dict({"ts": 1.0, "run_id": "x", "outcome": "ok"}))
    start = time.perf_counter()
    ledger.close()
    assert time.perf_counter() - start < 1.0
