"""The persistent oracle-query cache: keys, hits/misses, concurrency, and kill/resume."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from inpo.errors import ConfigError, OracleError
from inpo.oracles.cache import CachedOracle, QueryCache, cached_prob_prefers, query_key
from inpo.oracles.synthetic import TableOracle
from inpo.selection import tournament


def fake_p(prompt: str, a: str, b: str) -> float:
    """A deterministic 'answer' for any query (not antisymmetric: order matters)."""
    h = hashlib.sha256(f"{prompt}|{a}|{b}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32


class Recorder:
    """A backend that records every call; answers with :func:`fake_p`."""

    oracle_id = "recorder-v1"

    def __init__(self):
        self.calls: list[list[tuple[str, str, str]]] = []

    def prob_prefers(self, prompts, a, b):
        self.calls.append(list(zip(prompts, a, b)))
        return np.array([fake_p(*q) for q in zip(prompts, a, b)])

    @property
    def asked(self) -> int:
        return sum(len(c) for c in self.calls)


def ask(oracle, queries):
    prompts, a, b = (list(t) for t in zip(*queries))
    return oracle.prob_prefers(prompts, a, b)


def test_key_covers_everything_that_affects_the_answer():
    base = query_key("judge-v1", "tmpl-1", "x", "a", "b")
    assert base == query_key("judge-v1", "tmpl-1", "x", "a", "b")
    variants = [
        query_key("judge-v2", "tmpl-1", "x", "a", "b"),
        query_key("judge-v1", "tmpl-2", "x", "a", "b"),
        query_key("judge-v1", "tmpl-1", "y", "a", "b"),
        query_key("judge-v1", "tmpl-1", "x", "b", "a"),  # the ordered pair
        query_key("judge-v1", "tmpl-1", "x", "a", "b "),
        query_key("judge-v1", "tmpl-1", "xa", "", "b"),  # no ambiguity from concatenation
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert len(base) == 64 and int(base, 16) >= 0


def test_hits_misses_and_one_batched_backend_call(tmp_path):
    backend = Recorder()
    oracle = CachedOracle(backend, tmp_path / "sub" / "cache.sqlite", template_id="t1")
    qs = [("x", "a", "b"), ("x", "b", "a"), ("y", "a", "b"), ("x", "a", "b")]  # one duplicate
    first = ask(oracle, qs)
    np.testing.assert_array_equal(first, [fake_p(*q) for q in qs])
    assert first.dtype == np.float64
    assert len(backend.calls) == 1 and backend.calls[0] == qs[:3]  # misses, deduplicated
    assert (oracle.misses, oracle.hits, oracle.stats.queries) == (3, 1, 4)

    more = [("x", "a", "b"), ("z", "c", "d"), ("y", "a", "b"), ("z", "d", "c")]
    np.testing.assert_array_equal(ask(oracle, more), [fake_p(*q) for q in more])
    assert backend.calls[1] == [("z", "c", "d"), ("z", "d", "c")]  # only the misses
    assert (oracle.misses, oracle.hits, oracle.stats.backend_calls) == (5, 3, 2)

    ask(oracle, qs + more)  # everything cached: no backend call at all
    assert len(backend.calls) == 2 and oracle.stats.backend_calls == 2

    # Persistent: a fresh process-level object on the same file sees the answers.
    again = CachedOracle(Recorder(), tmp_path / "sub" / "cache.sqlite", template_id="t1")
    ask(again, qs)
    assert again.oracle.calls == [] and again.hits == 4
    # A different template (or oracle version) is a different query.
    other = CachedOracle(Recorder(), tmp_path / "sub" / "cache.sqlite", template_id="t2")
    ask(other, qs[:1])
    assert other.misses == 1
    assert oracle.cache.count(oracle_id="recorder-v1", template_id="t1") == 5
    assert len(oracle.cache) == 6


def test_failures_cache_nothing(tmp_path):
    class Failing:
        oracle_id = "failing-v1"

        def prob_prefers(self, prompts, a, b):
            raise OracleError("judge timed out after 3 retries")

    class Nonsense:
        oracle_id = "nonsense-v1"

        def prob_prefers(self, prompts, a, b):
            return np.array([0.3, 1.5])

    cached = CachedOracle(Failing(), tmp_path / "c.sqlite")
    with pytest.raises(OracleError, match="timed out"):
        ask(cached, [("x", "a", "b")])
    assert cached.stats.failures == 1
    bad = CachedOracle(Nonsense(), tmp_path / "c.sqlite")
    with pytest.raises(OracleError, match=r"P = 1\.5 .*nothing was cached"):
        ask(bad, [("x", "a", "b"), ("x", "c", "d")])
    assert len(bad.cache) == 0
    with pytest.raises(OracleError, match="same length"):
        bad.prob_prefers(["x"], ["a", "b"], ["c"])


def test_needs_an_oracle_id_and_a_known_schema(tmp_path):
    class Anonymous:
        def prob_prefers(self, prompts, a, b):
            return np.zeros(len(prompts))

    with pytest.raises(ConfigError, match="no oracle_id"):
        CachedOracle(Anonymous(), tmp_path / "c.sqlite")
    named = CachedOracle(Anonymous(), tmp_path / "c.sqlite", oracle_id="anon-v3")
    assert named.oracle_id == "anon-v3"
    named.close()
    with sqlite3.connect(tmp_path / "c.sqlite") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema'")
    with pytest.raises(OracleError, match="schema 99"):
        QueryCache(tmp_path / "c.sqlite")


def test_wal_mode_and_pickling(tmp_path):
    cache = QueryCache(tmp_path / "c.sqlite")
    (mode,) = cache._connection().execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"
    cache.put_many({"k": 0.25}, oracle_id="o")
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.get_many(["k", "missing"]) == {"k": 0.25}


def test_first_writer_wins_and_every_process_returns_the_stored_answer(tmp_path):
    """Two writers race on one query with different (stochastic) answers: both return the first."""
    path = tmp_path / "c.sqlite"
    rival = QueryCache(path)
    key = query_key("coin-v1", "", "x", "a", "b")

    def slow_backend(prompts, a, b):
        rival.put_many({key: 0.9}, oracle_id="coin-v1")  # the other process commits first
        return np.array([0.1])

    out = cached_prob_prefers(
        slow_backend, QueryCache(path), ["x"], ["a"], ["b"], oracle_id="coin-v1"
    )
    assert out.tolist() == [0.9]
    assert rival.get_many([key]) == {key: 0.9}


def test_tournament_through_the_cache_repeats_no_query(tmp_path):
    p = np.array([[0.5, 0.2, 0.9], [0.8, 0.5, 0.4], [0.1, 0.6, 0.5]])
    table = TableOracle(p, ["a", "b", "c"])
    cached = CachedOracle(table, tmp_path / "c.sqlite")
    first = tournament(cached, "x", ["a", "b", "c", "a"])
    asked = table.stats.queries
    assert tournament(cached, "x", ["a", "b", "c", "a"]) == first
    assert table.stats.queries == asked and cached.hits >= first.queries


# ---- several processes writing at once ------------------------------------------------------


def _writer(path: str, worker: int, n_keys: int, batch: int) -> dict[str, int]:
    """Run in a spawned process: answer a shuffled, overlapping set of queries in batches."""
    backend = Recorder()
    oracle = CachedOracle(backend, path)
    rng = np.random.default_rng(worker)
    order = rng.permutation(n_keys)
    for start in range(0, n_keys, batch):
        qs = [(f"prompt {i}", f"a{i}", f"b{i}") for i in order[start : start + batch]]
        got = ask(oracle, qs)
        expected = [fake_p(*q) for q in qs]
        if not np.array_equal(got, expected):
            raise AssertionError(f"worker {worker}: wrong answers {got} != {expected}")
    return {"asked": backend.asked, "hits": oracle.hits, "queries": oracle.stats.queries}


def test_concurrent_writers_from_several_processes(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    n_workers, n_keys, batch = 4, 120, 6
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(n_workers) as pool:
        results = pool.starmap(_writer, [(path, w, n_keys, batch) for w in range(n_workers)])
    assert all(r["queries"] == n_keys for r in results)
    cache = QueryCache(path)
    assert len(cache) == n_keys
    keys = [query_key("recorder-v1", "", f"prompt {i}", f"a{i}", f"b{i}") for i in range(n_keys)]
    stored = cache.get_many(keys)
    assert stored == {k: fake_p(f"prompt {i}", f"a{i}", f"b{i}") for i, k in enumerate(keys)}
    # Every query was asked at least once overall; the rest were hits.
    assert sum(r["asked"] for r in results) >= n_keys
    assert sum(r["asked"] + r["hits"] for r in results) == n_workers * n_keys


def _open_at_once(path: str, barrier, errors) -> None:
    barrier.wait()
    try:
        QueryCache(path).close()
    except Exception as exc:  # reported to the parent, which names it
        errors.put(repr(exc))


def test_processes_opening_a_fresh_file_at_once_wait_for_each_other(tmp_path):
    """The ranks of a run open the shared cache at once. SQLite calls no busy handler for
    ``PRAGMA journal_mode = WAL``: before the wait, 58 of 300 such pairs failed with
    "database is locked" (a 2-process ``inpo run`` did too)."""
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    errors = ctx.Queue()
    for trial in range(40):  # 0.81**40 < 1e-3: without the wait this fails
        barrier = ctx.Barrier(2)
        path = str(tmp_path / f"fresh{trial}.sqlite")
        procs = [ctx.Process(target=_open_at_once, args=(path, barrier, errors)) for _ in "ab"]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=60)
            assert proc.exitcode == 0
        assert errors.empty(), f"trial {trial}: {errors.get()}"
    for trial in (0, 39):
        conn = QueryCache(tmp_path / f"fresh{trial}.sqlite")._connection()
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# ---- a run killed with SIGKILL and restarted --------------------------------------------------

RUN_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from inpo.oracles.cache import CachedOracle

    db, progress, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])

    class SlowJudge:
        oracle_id = "slow-judge-v1"
        def __init__(self):
            self.asked = []
        def prob_prefers(self, prompts, a, b):
            time.sleep(delay)  # a slow backend: the kill lands inside a call
            self.asked += list(prompts)
            return np.array([(len(x) % 7) / 7 for x in a])

    oracle = CachedOracle(SlowJudge(), db)
    queries = [(f"prompt {i}", f"answer {i} " + "x" * i, f"other {i}") for i in range(60)]
    for start in range(0, len(queries), 5):
        prompts, a, b = (list(t) for t in zip(*queries[start : start + 5]))
        oracle.prob_prefers(prompts, a, b)
        with open(progress, "a") as f:
            f.write(f"{start}\\n")
    print(json.dumps({"asked": oracle.oracle.asked, "hits": oracle.hits}))
    """
)


def _committed_prompts(db) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def test_sigkill_then_restart_repeats_no_finished_query(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    db, progress = tmp_path / "cache.sqlite", tmp_path / "progress.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(db), str(progress), "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if progress.exists() and len(progress.read_text().split()) >= 3:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.01)
    time.sleep(0.05)  # into the next backend call
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    reported = len(progress.read_text().split())
    committed = _committed_prompts(db)
    assert committed % 5 == 0  # batches commit whole
    assert 5 * reported <= committed < 60  # every returned batch was committed; run unfinished

    done = subprocess.run(
        [sys.executable, str(script), str(db), str(progress), "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(done.stdout)
    asked = out["asked"]
    assert len(asked) == 60 - committed  # only the unfinished queries reach the backend
    assert sorted(asked, key=lambda x: int(x.split()[1])) == [
        f"prompt {i}" for i in range(committed, 60)
    ]
    assert out["hits"] == committed
    assert _committed_prompts(db) == 60


def test_threads_share_one_cached_oracle(tmp_path):
    """A threaded server may call one CachedOracle from many threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    oracle = CachedOracle(Recorder(), tmp_path / "c.sqlite")
    queries = [(f"p{i % 40}", f"a{i % 40}", "b") for i in range(400)]

    def work(start: int) -> bool:
        qs = queries[start : start + 20]
        return bool(np.array_equal(ask(oracle, qs), [fake_p(*q) for q in qs]))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(0, 400, 20)))
    assert len(oracle.cache) == 40 and oracle.stats.queries == 400


def _answers(n: int = 40) -> dict[str, float]:
    return {query_key("o", "t", f"prompt {i}", "a", "b"): (i % 10) / 10 for i in range(n)}


def test_an_altered_answer_fails_its_checksum_and_is_asked_again(tmp_path, caplog):
    import sqlite3

    store = QueryCache(tmp_path / "c.sqlite")
    answers = _answers()
    store.put_many(answers, oracle_id="o", template_id="t")
    store.close()
    key = next(iter(answers))
    with sqlite3.connect(tmp_path / "c.sqlite") as con:  # someone edits one answer by hand
        con.execute("UPDATE answers SET p = 0.99 WHERE key = ?", (key,))
    store = QueryCache(tmp_path / "c.sqlite")
    with caplog.at_level("WARNING"):
        got = store.get_many(answers)
    assert key not in got and len(got) == len(answers) - 1
    assert all(got[k] == answers[k] for k in got)
    assert "fail their checksum" in caplog.text
    assert len(store) == len(answers) - 1  # deleted: the next lookup asks the backend


@pytest.mark.parametrize("damage", ["header", "truncate"])
def test_a_corrupt_cache_file_is_set_aside_and_the_run_goes_on(tmp_path, caplog, damage):
    path = tmp_path / "c.sqlite"
    store = QueryCache(path)
    answers = _answers(2000)
    store.put_many(answers, oracle_id="o", template_id="t")
    store._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    raw = path.read_bytes()
    if damage == "header":
        path.write_bytes(b"this is not a database at all" * 4 + raw[116:])
    else:
        path.write_bytes(raw[: len(raw) // 2])
    with caplog.at_level("WARNING"):
        store = QueryCache(path)
        got = store.get_many(answers)
    assert "is corrupt" in caplog.text and "set aside" in caplog.text
    assert len(list(tmp_path.glob("c.sqlite.corrupt-*"))) >= 1  # kept for inspection
    assert all(got[k] == answers[k] for k in got)  # what was recovered is right
    store.put_many({"new": 0.5}, oracle_id="o", template_id="t")  # and the cache works
    assert store.get_many(["new"]) == {"new": 0.5}


def test_a_cache_written_before_row_checksums_is_upgraded_in_place(tmp_path):
    import sqlite3
    import time as _time

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as con:
        con.execute(
            "CREATE TABLE answers (key TEXT PRIMARY KEY, p REAL NOT NULL, oracle_id TEXT NOT "
            "NULL, template_id TEXT NOT NULL, created REAL NOT NULL) WITHOUT ROWID"
        )
        con.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
        con.execute("INSERT INTO meta VALUES ('schema', '1')")
        con.execute("INSERT INTO answers VALUES ('k1', 0.25, 'o', 't', ?)", (_time.time(),))
    store = QueryCache(path)
    assert store.get_many(["k1"]) == {"k1": 0.25}
    store.put_many({"k2": 0.75}, oracle_id="o", template_id="t")
    assert store.get_many(["k1", "k2"]) == {"k1": 0.25, "k2": 0.75}
