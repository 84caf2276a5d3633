"""The PostgreSQL ledger on a real server: many writers, schema creation and migration,
a server restart, the CLI, the default ledger from the environment, and many machines
(guards sharing a Redis store) writing one ledger that ``budgetguard report`` reads whole.

The server is the session's private one (``tests/postgres_server.py``); each test works in
a database of its own.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

import budgetguard.ledger as ledger_module
from budgetguard import Budget, BudgetGuard, cli
from budgetguard.ledger import Ledger, LedgerError, LedgerRecord, open_ledger
from budgetguard.ledger_postgres import PostgresSink
from budgetguard.ledger_sql import COLUMNS, JSON_FIELDS, POSTGRES, to_row
from budgetguard.stores.redis import RedisStore
from budgetguard.testing import StubOpenAIServer

pytestmark = pytest.mark.postgres

REPO = Path(ledger_module.__file__).resolve().parents[1]
D1 = 1793491200.0  # 2026-11-01T00:00:00Z


@pytest.fixture
def url(postgres_server: Any) -> str:
    """A fresh, empty database of the session's server."""
    return str(postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}"))


def call(run_id: str, **fields: Any) -> LedgerRecord:
    base = {"ts": D1, "run_id": run_id, "outcome": "ok", "model_requested": "gpt-4", "model_used": "gpt-4"}
    return LedgerRecord.from_dict({**base, **fields})


def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- many writers ----------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, threading
    from budgetguard.ledger import Ledger, LedgerRecord

    url, me, following, threads, per_thread = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    ledger = Ledger(url)  # every writer races to create the schema

    def work(t):
        for i in range(per_thread):
            ledger.record(LedgerRecord.from_dict({
                "ts": 1793491200.0 + i, "run_id": f"{me}-{t}-{i}", "outcome": "ok", "scope": {"user_id": me},
                "input_tokens": 1 + i % 7, "output_tokens": 2, "cost_usd": 0.001}))
            if i % 10 == 0:  # the sweep of another writer's call meets that call's own record
                ledger.record(LedgerRecord.from_dict({
                    "ts": 1793500000.0, "run_id": f"{following}-{t}-{i}", "outcome": "expired",
                    "input_tokens": 100, "output_tokens": 0, "cost_usd": 0.01}))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ledger.close()
    assert ledger.dropped == 0 and ledger.pending == 0
    """
)


def test_many_processes_and_threads_write_one_ledger_exactly(url: str) -> None:
    procs, threads, per_thread = 4, 4, 100
    names = [f"p{n}" for n in range(procs)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, me, names[(n + 1) % procs], str(threads), str(per_thread)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, me in enumerate(names)
    ]
    for proc in writers:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    # Every call once; each tenth one charged as its sweep said, whichever was written first.
    swept = [i % 10 == 0 for i in range(per_thread)]
    calls_each = threads * per_thread
    input_each = threads * sum(100 if s else 1 + i % 7 for i, s in enumerate(swept))
    output_each = threads * sum(0 if s else 2 for s in swept)
    with open_ledger(url) as ledger:
        rows = ledger.totals(by="user")
        outcomes = {r["outcome"]: r.calls for r in ledger.totals(by="outcome")}
        assert [(r["user"], r.calls, r.input_tokens, r.output_tokens) for r in rows] == [
            (me, calls_each, input_each, output_each) for me in names
        ]
        assert outcomes == {"expired": procs * threads * sum(swept), "ok": procs * threads * (per_thread - sum(swept))}
        assert sum(r.cost_usd for r in rows) == pytest.approx(procs * threads * (sum(swept) * 0.01 + 90 * 0.001))
    with psycopg.connect(url) as conn:
        conn.execute("SET search_path TO budgetguard")
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT run_key) FROM calls").fetchone() == (
            procs * calls_each,
            procs * calls_each,
        )


# -- schema: created, migrated, refused ---------------------------------------------------


def test_a_schema_1_ledger_is_migrated_in_place(url: str) -> None:
    old = [
        call("a", input_tokens=10, metadata={"feature": "chat"}),
        call("dup", input_tokens=20),  # a run id written twice by budgetguard 0.1:
        call("dup", outcome="expired", input_tokens=30),  # history, kept as it was
        call("b", input_tokens=40),
    ]
    with psycopg.connect(url, autocommit=True) as conn:  # a version-1 ledger: no run_key
        conn.execute("CREATE SCHEMA budgetguard")
        conn.execute("SET search_path TO budgetguard")
        for statement in POSTGRES.migrations()[1]:
            conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
        v1 = COLUMNS[:-1]
        marks = ", ".join("%s::jsonb" if c in JSON_FIELDS else "%s" for c in v1)
        with conn.cursor() as cursor:
            cursor.executemany(f"INSERT INTO calls ({', '.join(v1)}) VALUES ({marks})", [to_row(r)[:-1] for r in old])
    ledger = Ledger(url)
    with psycopg.connect(url) as conn:
        conn.execute("SET search_path TO budgetguard")
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
        keys = conn.execute("SELECT run_id, run_key FROM calls ORDER BY id").fetchall()
    assert keys == [("a", "a"), ("dup", None), ("dup", None), ("b", "b")]
    assert ledger.totals()[0].input_tokens == 100
    ledger.record(call("a", outcome="expired", input_tokens=15, ts=D1 + 60))  # the rule holds on migrated rows
    ledger.record(call("c", input_tokens=5))
    (a,) = [r for r in ledger.records() if r.run_id == "a"]
    assert (a.outcome, a.input_tokens, a.metadata, a.ts) == ("expired", 15, {"feature": "chat"}, D1)
    assert (ledger.totals()[0].calls, ledger.totals()[0].input_tokens) == (5, 110)
    ledger.close()


def test_a_ledger_from_a_newer_budgetguard_is_refused(url: str) -> None:
    Ledger(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE budgetguard.schema_version SET version = 99")
    with pytest.raises(LedgerError, match=r"newer budgetguard \(schema 99\)"):
        Ledger(url)


def test_no_ledger_and_foreign_tables_are_explained(url: str) -> None:
    with pytest.raises(LedgerError, match="no budgetguard ledger in .*nothing was recorded there yet"):
        open_ledger(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app")
        conn.execute("CREATE TABLE app.calls (id int)")
    with pytest.raises(LedgerError, match="holds a 'calls' table that is not a budgetguard ledger"):
        PostgresSink(url, schema="app")
    with pytest.raises(LedgerError, match="lowercase SQL identifier"):
        PostgresSink(url, schema="x; DROP TABLE app.calls")
    ledger = Ledger(PostgresSink(url, schema="ledger_b"))  # any schema of one's own
    ledger.record(call("x"))
    assert Ledger(PostgresSink(url, schema="ledger_b", create=False)).totals()[0].calls == 1
    ledger.close()


def test_passwords_never_reach_messages(postgres_server: Any) -> None:
    from redis_server import free_port

    secret = f"postgresql://budgetguard:s3cr3t-pw@127.0.0.1:{free_port()}/nothing?connect_timeout=2"
    with pytest.raises(LedgerError) as info:
        Ledger(secret)
    assert "s3cr3t" not in str(info.value) and "budgetguard:***@127.0.0.1" in str(info.value)
    with pytest.raises(LedgerError) as info:
        Ledger("postgresql:///nothing?host=/nonexistent&password=s3cr3t-pw&connect_timeout=2")
    assert "s3cr3t" not in str(info.value) and "password=***" in str(info.value)


def test_writes_survive_a_server_restart(caplog: pytest.LogCaptureFixture) -> None:
    from postgres_server import PostgresServer

    with PostgresServer() as server:
        ledger = Ledger(server.socket_url, retry_interval=0.05)  # over the unix socket in the server's dir
        ledger.record(call("before"))
        server.stop()
        with caplog.at_level(logging.WARNING, logger="budgetguard"):
            ledger.record(call("during"))  # never raises: kept in memory, retried
            assert ledger.pending == 1
            server.start()
            deadline = time.monotonic() + 20
            while ledger.pending and time.monotonic() < deadline:
                time.sleep(0.05)
            ledger.flush()  # returns once the retry thread's write is done
        assert ledger.pending == 0 and "recovered" in caplog.text
        ledger.record(call("after"))  # stored on return again, over a new connection
        assert sorted(r.run_id for r in ledger.sink.read()) == ["after", "before", "during"]
        ledger.close()


# -- the command line and the default ledger ---------------------------------------------------


def test_report_reads_a_postgres_ledger_like_a_sqlite_one(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [
        call(f"r{i}", ts=D1 + i * 3600, scope={"user_id": ("alice", "bob")[i % 2]}, input_tokens=100 + i,
             output_tokens=10, cost_usd=0.001 * i, metadata={"feature": ("chat", "search")[i % 3 % 2]})
        for i in range(30)
    ]  # fmt: skip
    for spec in (url, str(tmp_path / "same.sqlite3")):
        with Ledger(spec) as ledger:
            for r in records:
                ledger.record(r)
    outputs = []
    for spec in (url, str(tmp_path / "same.sqlite3")):
        for by in ("user", "day", "feature,model"):
            assert cli.main(["report", "--ledger", spec, "--by", by, "--format", "json"]) == 0
            outputs.append(capsys.readouterr().out)
    assert outputs[:3] == outputs[3:]
    assert [(r["user"], r["calls"]) for r in json.loads(outputs[0])] == [("alice", 15), ("bob", 15)]
    monkeypatch.setenv("BUDGETGUARD_LEDGER", url)  # the environment names the shared ledger
    assert cli.main(["report", "--by", "user", "--format", "json"]) == 0
    assert capsys.readouterr().out == outputs[0]
    assert cli.main(["report", "--by", "user"]) == 0  # the table
    assert "alice" in capsys.readouterr().out
    html = tmp_path / "spend.html"
    assert cli.main(["report", "--html", str(html)]) == 0
    assert "alice" in html.read_text()


def test_status_and_the_default_ledger_from_the_environment(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = tmp_path / "shared_app.py"
    app.write_text(
        "from budgetguard import Budget, BudgetGuard\n"
        "from budgetguard.testing.fake_models import UsageFakeChatModel\n"
        "guard = BudgetGuard([Budget('per-user', limit=100_000, per='user_id')])  # ledger=None: the default\n"
        "def call(user):\n"
        "    model = UsageFakeChatModel(model_name='gpt-4', input_tokens=9, replies=['a b'])\n"
        "    (guard | model).invoke('hi', {'configurable': {'user_id': user}})\n"
    )
    code = "import sys; sys.path.insert(0, sys.argv[1]); import shared_app; shared_app.call('alice')"
    run_python(code, str(tmp_path), env={"BUDGETGUARD_LEDGER": url})
    with open_ledger(url) as ledger:  # a guard with the default ledger wrote to PostgreSQL
        assert [(r["user"], r.input_tokens, r.output_tokens) for r in ledger.totals(by="user")] == [("alice", 9, 2)]
    monkeypatch.setenv("BUDGETGUARD_LEDGER", url)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["status", "shared_app:guard", "--scope", "user_id=alice"]) == 0
    assert "per-user" in capsys.readouterr().out


# -- many machines, one ledger ---------------------------------------------------------------

MACHINE = textwrap.dedent(
    """
    import sys
    from langchain_openai import ChatOpenAI
    from budgetguard import Budget, BudgetGuard
    from budgetguard.stores.redis import RedisStore

    redis_url, namespace, ledger_url, base_url, machine, calls = sys.argv[1:7]
    guard = BudgetGuard(
        [Budget("per-user", limit=100_000, per="user_id"), Budget("org", limit=1_000_000)],
        store=RedisStore(redis_url, namespace=namespace), ledger=ledger_url)
    llm = ChatOpenAI(model="gpt-4", base_url=base_url, api_key="sk-test", max_retries=0, max_tokens=40)
    for i in range(int(calls)):
        user = ("alice", "bob", "carol")[i % 3]
        (guard | llm).invoke(f"question {i} from {machine}",
                             {"configurable": {"user_id": user}, "metadata": {"machine": machine}})
    """
)


@pytest.mark.redis
def test_two_machines_share_a_redis_store_and_one_postgres_ledger(
    url: str, redis_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace = f"machines-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with StubOpenAIServer(reply_tokens=25) as provider:
        machines = [
            subprocess.Popen(
                [sys.executable, "-c", MACHINE, redis_server.url, namespace, url, provider.base_url, name, str(n)],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, n in (("app-1", 9), ("app-2", 6))
        ]
        for proc in machines:
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err
        billed = sum(r.prompt_tokens + r.completion_tokens for r in provider.requests if r.prompt_tokens)
    assert cli.main(["report", "--ledger", url, "--by", "meta:machine", "--format", "json"]) == 0
    rows = {r["meta:machine"]: r for r in json.loads(capsys.readouterr().out)}
    assert {m: r["calls"] for m, r in rows.items()} == {"app-1": 9, "app-2": 6}
    assert sum(r["total_tokens"] for r in rows.values()) == billed  # what the provider counted
    store = RedisStore(redis_server.url, namespace=namespace)
    reader = BudgetGuard([Budget("per-user", limit=100_000, per="user_id"), Budget("org", limit=1_000_000)],
                         store=store, ledger=False)  # fmt: skip
    assert 1_000_000 - reader.remaining("org") == billed  # what the shared store charged
    with open_ledger(url) as ledger:
        users = {r["user"]: r.total_tokens for r in ledger.totals(by="user")}
    assert {u: 100_000 - reader.remaining("per-user", user_id=u) for u in users} == users
    store.close()


def test_records_stream_beyond_one_chunk(url: str) -> None:
    with Ledger(url) as ledger:
        ledger.sink.write([replace(call("x"), run_id=f"m{i}", ts=D1 + i) for i in range(2500)])
        stream = ledger.records(since=D1 + 100)
        assert next(stream).run_id == "m100"
        assert sum(1 for _ in stream) == 2399
