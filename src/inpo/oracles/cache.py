"""A persistent, process-safe cache of oracle answers in SQLite.

Every answer is stored under a SHA-256 of everything that affects it: the oracle's id (which
includes its version), a prompt-template id, the prompt and the **ordered** pair ``(a, b)`` —
``(a, b)`` and ``(b, a)`` are different queries, since a judge may have a position bias.

Guarantees:

* **Resumable**: each batch of fresh answers is committed before ``prob_prefers`` returns, so a
  run killed (even by SIGKILL) and restarted asks the backend only the queries that had not
  been answered.
* **Concurrent writers**: the database is in WAL mode with a busy timeout; writes are short
  ``BEGIN IMMEDIATE`` transactions of ``INSERT OR IGNORE`` (the first writer of a key wins and
  every reader then sees that one answer — fresh answers are read back after the write).
  Connections are per process (reopened after ``fork``) and guarded by a lock for threads.
* **One backend call per batch**: only the misses, deduplicated, go to the backend, in one call.
* **Verified rows**: each row carries a checksum of its key, answer and ids; a row whose
  checksum fails (an edited or damaged answer) is reported, deleted and asked again, never used.
* **A corrupt file is set aside**: a database SQLite cannot read is renamed
  ``<name>.corrupt-<time>`` (kept for inspection), the rows that can still be read (and pass
  their checksums) are copied into a fresh file, and the run goes on, saying how many.

Building blocks for backends: :func:`query_key`, :class:`QueryCache` (the store) and
:func:`cached_prob_prefers` (the lookup-forward-store step); :class:`CachedOracle` wraps any
oracle with them. Only the standard library and NumPy are imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from inpo.errors import ConfigError, OracleError
from inpo.oracles.base import OracleStats, PreferenceOracle

__all__ = [
    "CACHE_SCHEMA",
    "CachedOracle",
    "QueryCache",
    "RankQueryCache",
    "cached_prob_prefers",
    "merge_rank_caches",
    "query_key",
    "rank_cache_path",
    "row_check",
]

CACHE_SCHEMA = 1  # part of every key: changing it would orphan every stored answer
_SQL_CHUNK = 500  # keys per SELECT … IN (…), well under SQLite's variable limit

Backend = Callable[[list[str], list[str], list[str]], np.ndarray]


log = logging.getLogger(__name__)
_COLUMNS = "key, p, oracle_id, template_id, created, chk"


def row_check(key: str, p: float, oracle_id: str, template_id: str) -> str:
    """The checksum stored with an answer (16 hex digits of SHA-256 of the row's content)."""
    payload = json.dumps([key, float(p).hex(), oracle_id, template_id], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _failed(action: str, path: Path, exc: sqlite3.Error) -> OracleError:
    """An OracleError for a failed SQLite call; a full disk or an I/O failure says what to do."""
    msg = f"{action} the oracle cache {path} failed: {exc}"
    if any(m in str(exc).lower() for m in ("disk i/o error", "disk is full", "readonly")):
        msg += (
            "; answers already stored are kept: fix the cause (free space, permissions) and "
            "re-run the same command"
        )
    return OracleError(msg)


def _is_corruption(exc: sqlite3.Error) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in msg or "malformed" in msg or "corrupt" in msg
    )


def query_key(oracle_id: str, template_id: str, prompt: str, a: str, b: str) -> str:
    """SHA-256 (hex) of one ordered query; a JSON list, so no two inputs share an encoding."""
    payload = json.dumps(
        ["inpo-query", CACHE_SCHEMA, oracle_id, template_id, prompt, a, b],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class QueryCache:
    """The SQLite store: ``key → P(a ≻ b)`` plus the oracle and template ids for inspection.

    Args:
        path: the database file (its folder is created).
        timeout_s: how long a writer waits for the lock before failing (busy timeout).
        synchronous: SQLite's ``synchronous`` pragma. ``"NORMAL"`` (default, with WAL) keeps
            every committed batch through a process crash or SIGKILL; ``"FULL"`` also through
            a power loss, at one fsync per batch.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timeout_s: float = 60.0, synchronous: str = "NORMAL"
    ) -> None:
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ConfigError(f"synchronous={synchronous!r}; expected OFF, NORMAL, FULL or EXTRA")
        self.path = Path(path)
        self.timeout_s = float(timeout_s)
        self.synchronous = synchronous.upper()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._connection()  # fail early on an unusable path

    # -- connection ------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # A connection inherited through fork must not be used (nor closed) by the child.
        try:
            conn = self._open()
        except sqlite3.Error as exc:
            if not _is_corruption(exc):
                raise _failed("opening", self.path, exc) from None
            self._recover(str(exc))
            try:
                conn = self._open()
            except sqlite3.Error as exc2:
                raise _failed("opening", self.path, exc2) from None
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            self._wal(conn)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, p REAL NOT NULL, "
                "oracle_id TEXT NOT NULL, template_id TEXT NOT NULL, created REAL NOT NULL, "
                "chk TEXT) WITHOUT ROWID"
            )
            conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(CACHE_SCHEMA),))
            (schema,) = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if schema != str(CACHE_SCHEMA):
                raise OracleError(
                    f"oracle cache {self.path} has schema {schema}; this inpo writes schema "
                    f"{CACHE_SCHEMA} (use another cache file)"
                )
            columns = [row[1] for row in conn.execute("PRAGMA table_info(answers)")]
            if "chk" not in columns:  # a cache written before rows carried checksums
                self._add_checksums(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _wal(self, conn: sqlite3.Connection) -> None:
        """Put the file in WAL mode (a no-op once it is), waiting out other processes.

        SQLite does not call the busy handler for a journal-mode change: two processes opening
        a fresh file at once (the ranks of a run, each opening the shared cache) got "database
        is locked" at once in 58 of 300 trials. So this waits, up to ``timeout_s`` like every
        other lock here, with a back-off from 5 ms to 100 ms (six lines of the standard
        library: not worth a retry package in a module that imports only it and NumPy).
        """
        deadline = time.monotonic() + self.timeout_s
        pause = 0.005
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(2 * pause, 0.1)

    @staticmethod
    def _add_checksums(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("ALTER TABLE answers ADD COLUMN chk TEXT")
            rows = conn.execute("SELECT key, p, oracle_id, template_id FROM answers").fetchall()
            conn.executemany(
                "UPDATE answers SET chk = ? WHERE key = ?",
                [(row_check(k, p, o, t), k) for k, p, o, t in rows],
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _recover(self, reason: str) -> None:
        """Set the unreadable file aside and start a fresh one with every row still readable
        (and passing its checksum)."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{os.getpid()}")
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(Path(f"{self.path}{suffix}"), Path(f"{aside}{suffix}"))
            except FileNotFoundError:  # absent, or another process set it aside first
                pass
        salvaged: list[tuple] = []
        try:
            old = sqlite3.connect(f"file:{aside}?mode=ro", uri=True)
            try:
                for row in old.execute(f"SELECT {_COLUMNS} FROM answers"):
                    salvaged.append(row)
            finally:
                old.close()
        except sqlite3.Error:
            pass  # what was read before the damage is kept
        good = [r for r in salvaged if r[5] is None or r[5] == row_check(*r[:4])]
        fresh = self._open()
        try:
            fresh.execute("BEGIN IMMEDIATE")
            fresh.executemany(
                f"INSERT OR IGNORE INTO answers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                [(*r[:5], row_check(*r[:4])) for r in good],
            )
            fresh.execute("COMMIT")
        finally:
            fresh.close()
        log.warning(
            "oracle cache %s is corrupt (%s): set aside as %s; %d answers recovered into a fresh "
            "cache, the others will be asked again",
            self.path,
            reason,
            aside,
            len(good),
        )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> QueryCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, object]:  # picklable: reopened in the other process
        return {"path": self.path, "timeout_s": self.timeout_s, "synchronous": self.synchronous}

    def __setstate__(self, state: dict[str, object]) -> None:
        path, timeout_s, sync = state["path"], state["timeout_s"], state["synchronous"]
        assert isinstance(path, Path) and isinstance(timeout_s, float) and isinstance(sync, str)
        QueryCache.__init__(self, path, timeout_s=timeout_s, synchronous=sync)

    # -- reads and writes ------------------------------------------------------------------
    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        """The stored answers among ``keys`` (missing keys are absent from the result)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, float] = {}
        with self._lock:
            conn = self._connection()
            try:
                rows = []
                for i in range(0, len(keys), _SQL_CHUNK):
                    chunk = keys[i : i + _SQL_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    rows += conn.execute(
                        f"SELECT key, p, oracle_id, template_id, chk FROM answers "
                        f"WHERE key IN ({marks})",
                        chunk,
                    ).fetchall()
            except sqlite3.Error as exc:
                if not _is_corruption(exc):
                    raise _failed("reading", self.path, exc) from None
                self.close()
                self._recover(str(exc))
                return self.get_many(keys)
            bad = []
            for key, p, oracle_id, template_id, chk in rows:
                valid = isinstance(p, float) and math.isfinite(p) and 0.0 <= p <= 1.0
                if valid and chk == row_check(key, p, oracle_id, template_id):
                    found[key] = p
                else:
                    bad.append(key)
            if bad:
                log.warning(
                    "oracle cache %s: %d stored answer(s) fail their checksum (altered or "
                    "damaged); deleted, they will be asked again",
                    self.path,
                    len(bad),
                )
                try:
                    conn.executemany("DELETE FROM answers WHERE key = ?", [(k,) for k in bad])
                except sqlite3.Error as exc:
                    raise OracleError(f"cleaning the oracle cache {self.path}: {exc}") from None
        return found

    def put_many(
        self, answers: Mapping[str, float], *, oracle_id: str = "", template_id: str = ""
    ) -> None:
        """Store answers in one short transaction; keys already stored keep their answer."""
        if not answers:
            return
        now = time.time()
        rows = [
            (k, float(p), oracle_id, template_id, now, row_check(k, p, oracle_id, template_id))
            for k, p in answers.items()
        ]
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(
                        f"INSERT OR IGNORE INTO answers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _failed("writing", self.path, exc) from None

    def __len__(self) -> int:
        with self._lock:
            (n,) = self._connection().execute("SELECT COUNT(*) FROM answers").fetchone()
        return int(n)

    def count(self, oracle_id: str | None = None, template_id: str | None = None) -> int:
        """Number of stored answers, optionally for one oracle id and/or template id."""
        where, args = [], []
        for col, val in (("oracle_id", oracle_id), ("template_id", template_id)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "SELECT COUNT(*) FROM answers" + (" WHERE " + " AND ".join(where) if where else "")
        with self._lock:
            (n,) = self._connection().execute(sql, args).fetchone()
        return int(n)


def rank_cache_path(shared: str | os.PathLike[str], rank: int) -> Path:
    """The file rank ``rank`` of a multi-process run writes its fresh answers to."""
    shared = Path(shared)
    return shared.with_name(f"{shared.stem}.rank{rank:03d}{shared.suffix}")


class RankQueryCache(QueryCache):
    """One rank's view of a shared cache in a multi-process run: reads the shared file and
    its own, writes only its own (``<name>.rankNNN.sqlite``).

    No two processes — on one node or several — ever write one SQLite file, so nothing is
    lost or written twice by concurrent writers (SQLite's locking is unreliable on network
    file systems). Rank 0 folds every rank file into the shared one with
    :func:`merge_rank_caches` at points where no rank writes (between stages, and at the
    start of a run, which also recovers the answers of a killed multi-process run whatever
    the number of processes of the next one).
    """

    def __init__(self, shared: str | os.PathLike[str], rank: int, **kwargs: object) -> None:
        self.shared = QueryCache(shared, **kwargs)  # type: ignore[arg-type]
        self.rank = int(rank)
        super().__init__(rank_cache_path(shared, rank), **kwargs)  # type: ignore[arg-type]

    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        keys = list(dict.fromkeys(keys))
        found = self.shared.get_many(keys)
        rest = [k for k in keys if k not in found]
        if rest:
            found.update(super().get_many(rest))
        return found

    def __len__(self) -> int:
        return len(self.shared) + super().__len__()

    def close(self) -> None:
        self.shared.close()
        super().close()

    def __getstate__(self) -> dict[str, object]:
        return {**super().__getstate__(), "shared_path": self.shared.path, "rank": self.rank}

    def __setstate__(self, state: dict[str, object]) -> None:
        shared, rank = state["shared_path"], state["rank"]
        assert isinstance(shared, Path) and isinstance(rank, int)
        RankQueryCache.__init__(self, shared, rank)


def merge_rank_caches(shared: str | os.PathLike[str]) -> int:
    """Fold every ``<shared>.rankNNN`` file into ``shared`` (first answer of a key wins), then
    delete them; return the number of answers added. Idempotent: a merge killed half-way is
    finished by the next one. Call it only while no rank writes."""
    shared = Path(shared)
    files = sorted(shared.parent.glob(f"{shared.stem}.rank[0-9][0-9][0-9]{shared.suffix}"))
    if not files:
        return 0
    store = QueryCache(shared)
    before = len(store)
    try:
        conn = store._connection()
        for f in files:
            QueryCache(f).close()  # same layout as ours (checksums added to an older file)
            try:
                conn.execute("ATTACH DATABASE ? AS r", (str(f),))
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute(
                        f"INSERT OR IGNORE INTO answers ({_COLUMNS}) "
                        f"SELECT {_COLUMNS} FROM r.answers"
                    )
                    conn.execute("COMMIT")
                finally:
                    conn.execute("DETACH DATABASE r")
            except sqlite3.Error as exc:
                raise OracleError(f"merging the oracle cache {f} into {shared}: {exc}") from None
            for extra in (f, Path(f"{f}-wal"), Path(f"{f}-shm")):
                extra.unlink(missing_ok=True)
        return len(store) - before
    finally:
        store.close()


def cached_prob_prefers(
    backend: Backend,
    cache: QueryCache,
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    *,
    oracle_id: str,
    template_id: str = "",
    stats: OracleStats | None = None,
    stream: Callable[..., Iterable[tuple[int, float]]] | None = None,
) -> np.ndarray:
    """Answer ``P(a_i ≻ b_i | prompt_i)`` from ``cache``, asking ``backend`` only the misses.

    The misses (deduplicated, in order of first appearance) go to ``backend(prompts, a, b)`` in
    one call; its answers are validated (finite, in ``[0, 1]``), committed, and read back (so
    that, with concurrent writers, every process returns the answer stored first). The answer
    is the float64 array ``[n]``. With ``stream`` (``(prompts, a, b) -> (j, P)`` pairs as they
    are answered, e.g. :meth:`HTTPJudgeOracle.iter_prob_prefers`) each answer is validated and
    committed as it arrives, so a failure part-way keeps every answer received before it.

    ``stats`` (if given): ``queries += n``; ``cache_hits +=`` queries answered without the
    backend (stored, or a duplicate of an earlier query in the batch); ``backend_calls += 1``
    when there were misses; ``extra["cache_misses"] +=`` distinct queries sent to the backend.
    """
    n = len(prompts)
    if len(responses_a) != n or len(responses_b) != n:
        raise OracleError(
            f"prob_prefers got {n} prompts, {len(responses_a)} responses_a and "
            f"{len(responses_b)} responses_b; they must have the same length"
        )
    keys = [
        query_key(oracle_id, template_id, p, a, b)
        for p, a, b in zip(prompts, responses_a, responses_b)
    ]
    answers = cache.get_many(keys)
    miss_pos: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k not in answers and k not in miss_pos:
            miss_pos[k] = i
    if miss_pos:
        idx = list(miss_pos.values())
        miss_keys = list(miss_pos)
        args = (
            [prompts[i] for i in idx],
            [responses_a[i] for i in idx],
            [responses_b[i] for i in idx],
        )

        def invalid(j: int, p: float, kept: str) -> OracleError:
            return OracleError(
                f"oracle {oracle_id!r} returned P = {p!r} for prompt {prompts[idx[j]]!r}; "
                f"expected a value in [0, 1] ({kept})"
            )

        try:
            if stream is not None:
                # commit each answer as it arrives: a later failure loses none of them
                for j, p in stream(*args):
                    p = float(p)
                    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
                        raise invalid(j, p, "not cached; the answers before it were")
                    cache.put_many({miss_keys[j]: p}, oracle_id=oracle_id, template_id=template_id)
            else:
                fresh = np.asarray(backend(*args), dtype=np.float64)
                if fresh.shape != (len(idx),):
                    raise OracleError(
                        f"oracle {oracle_id!r} returned shape {fresh.shape} for {len(idx)} queries"
                    )
                bad = ~np.isfinite(fresh) | (fresh < 0) | (fresh > 1)
                if bad.any():
                    j = int(np.flatnonzero(bad)[0])
                    raise invalid(j, float(fresh[j]), "nothing was cached")
                cache.put_many(
                    dict(zip(miss_keys, fresh)), oracle_id=oracle_id, template_id=template_id
                )
        except OracleError:
            if stats is not None:
                stats.failures += 1
            raise
        answers.update(cache.get_many(miss_keys))
        missing = [k for k in miss_keys if k not in answers]
        if missing:
            raise OracleError(f"oracle {oracle_id!r} left {len(missing)} queries unanswered")
    if stats is not None:
        stats.queries += n
        stats.cache_hits += n - len(miss_pos)
        if miss_pos:
            stats.backend_calls += 1
            stats.extra["cache_misses"] = stats.extra.get("cache_misses", 0) + len(miss_pos)
    return np.array([answers[k] for k in keys], dtype=np.float64)


class CachedOracle:
    """Any :class:`~inpo.oracles.base.PreferenceOracle` behind a persistent query cache.

    Args:
        oracle: the backend; its ``oracle_id`` (identity incl. version) is part of every key.
        path: an SQLite file, or a shared :class:`QueryCache`.
        template_id: the prompt template's id, part of every key (change it when the judge's
            prompt changes).
        oracle_id: overrides ``oracle.oracle_id`` (required if the oracle has none).

    ``stats`` counts this wrapper's traffic (see :func:`cached_prob_prefers`); the backend's own
    ``stats`` counts only what it was asked. ``oracle_id`` is the backend's: caching does not
    change answers.
    """

    def __init__(
        self,
        oracle: PreferenceOracle,
        path: str | os.PathLike[str] | QueryCache,
        *,
        template_id: str = "",
        oracle_id: str | None = None,
    ) -> None:
        oid = oracle_id if oracle_id is not None else getattr(oracle, "oracle_id", None)
        if not isinstance(oid, str) or not oid:
            raise ConfigError(
                f"{type(oracle).__name__} has no oracle_id; pass CachedOracle(..., oracle_id=...) "
                "naming the backend and its version"
            )
        self.oracle = oracle
        self.oracle_id = oid
        self.template_id = template_id
        self.cache = path if isinstance(path, QueryCache) else QueryCache(path)
        self.stats = OracleStats()

    @property
    def hits(self) -> int:
        return self.stats.cache_hits

    @property
    def misses(self) -> int:
        return self.stats.extra.get("cache_misses", 0)

    def prob_prefers(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
    ) -> np.ndarray:
        """``P(a_i ≻ b_i | prompt_i)``, float64 ``[n]``; misses go to the backend in one call."""
        return cached_prob_prefers(
            lambda p, a, b: self.oracle.prob_prefers(p, a, b),
            self.cache,
            prompts,
            responses_a,
            responses_b,
            oracle_id=self.oracle_id,
            template_id=self.template_id,
            stats=self.stats,
            stream=getattr(self.oracle, "iter_prob_prefers", None),
        )

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> CachedOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
