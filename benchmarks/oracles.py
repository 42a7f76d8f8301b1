"""Cost of pair selection on model oracles, and the HTTP judge's throughput.

Part 1 — selection rules (``inpo.selection``) on a tiny Bradley–Terry reward model and a tiny
pairwise preference model (Llama, built from a config and reloaded from disk, float32 CPU),
``P`` prompts × ``K`` sampled responses (random printable strings of 20–120 characters):

* ``tournament`` — the INPO knock-out (``3K/2 − 1`` pairwise queries a prompt);
* ``best/worst-of-K`` — by reward (``K`` reward evaluations; reward model only);
* ``all-pairs win rates`` — SPPO-style, ``K(K − 1)/2`` queries.

Each rule runs two ways, in the same process, on the same oracle weights:
**batched** (the ``*_batch`` function over all prompts, model batch size 32) and the
**one-by-one** baseline (the per-prompt function, every pairwise query its own ``prob_prefers``
call, model batch size 1). Reported per prompt: pairwise queries (reward evaluations for
best/worst), model forward sequences (the reward model caches per response; the pairwise model
reads both orders of every pair), and wall time. The two ways must select the same pairs.

Part 2 — :class:`inpo.oracles.http.HTTPJudgeOracle` against ``inpo serve-oracle``
(:class:`inpo.oracles.server.OracleServer` on loopback, a table oracle behind it) with a
server-side delay per request to mimic a model (default 20 ms), at client concurrency 1, 4 and
16. A pairwise query is two requests (both orders). Baseline: concurrency 1.

Run: ``python benchmarks/oracles.py`` (writes ``benchmarks/results/oracles.md``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "oracles.md"


class OneByOne:
    """Wraps an oracle so that every pairwise query is its own ``prob_prefers`` call."""

    def __init__(self, oracle) -> None:
        self.oracle = oracle
        self.oracle_id = oracle.oracle_id
        self.stats = oracle.stats

    def prob_prefers(self, prompts, responses_a, responses_b) -> np.ndarray:
        return (
            np.concatenate(
                [
                    self.oracle.prob_prefers([p], [a], [b])
                    for p, a, b in zip(prompts, responses_a, responses_b)
                ]
            )
            if len(prompts)
            else np.zeros(0)
        )

    def rewards(self, prompts, responses) -> np.ndarray:
        return np.concatenate([self.oracle.rewards([p], [r]) for p, r in zip(prompts, responses)])


def _samples(n_prompts: int, k: int, seed: int) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz     .,!?"))

    def text(lo: int, hi: int) -> str:
        return "".join(rng.choice(alphabet, size=int(rng.integers(lo, hi))))

    prompts = [f"Question {i}: {text(10, 40)}?" for i in range(n_prompts)]
    return prompts, [[text(20, 120) for _ in range(k)] for _ in prompts]


def _build_models(folder: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    import torch

    from inpo.tiny import char_tokenizer, tiny_causal_lm, tiny_reward_model

    tok = char_tokenizer()
    sizes = {"hidden_size": hidden, "num_hidden_layers": layers, "max_position_embeddings": 512}
    rm = tiny_reward_model("llama", tok, seed=1, **sizes)
    pm = tiny_causal_lm("llama", tok, seed=2, **sizes)
    with torch.no_grad():  # spread the outputs so that selections are not all ties
        rm.score.weight.mul_(40.0)
        pm.lm_head.weight.mul_(40.0)
    for model, name in ((rm, "rm"), (pm, "pm")):
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    return folder / "rm", folder / "pm"


def _sequences(oracle) -> int:
    return int(oracle.stats.extra.get("sequences_scored", 0))


def _run_rule(
    make_oracle: Callable[[int], object],
    rule: str,
    prompts: list[str],
    samples: list[list[str]],
    repeats: int,
) -> dict[str, dict]:
    from inpo.selection import (
        best_worst_by_reward,
        best_worst_by_reward_batch,
        tournament,
        tournament_batch,
        win_rates,
        win_rates_batch,
    )

    out: dict[str, dict] = {}
    for _ in range(repeats):  # the two ways alternate, since the cores are shared
        for way in ("one-by-one", "batched"):
            oracle = make_oracle(1 if way == "one-by-one" else 32)
            oracle.prob_prefers(["warm-up"] * 2, ["a", "b c"], ["d e f", "g"])  # first-call costs
            if hasattr(oracle, "clear_cache"):
                oracle.clear_cache()
            seq0 = _sequences(oracle)
            t0 = time.perf_counter()
            if way == "batched":
                if rule == "tournament":
                    res = tournament_batch(oracle, prompts, samples)
                elif rule == "best/worst-of-K":
                    res = best_worst_by_reward_batch(oracle, prompts, samples)
                else:
                    res = win_rates_batch(oracle, prompts, samples)
            else:
                one = OneByOne(oracle)
                if rule == "tournament":
                    res = [tournament(one, p, s) for p, s in zip(prompts, samples)]
                elif rule == "best/worst-of-K":
                    res = [best_worst_by_reward(one, p, s) for p, s in zip(prompts, samples)]
                else:
                    res = [win_rates(one, p, s) for p, s in zip(prompts, samples)]
            seconds = time.perf_counter() - t0
            if rule == "all-pairs win rates":
                picks = np.concatenate([r.win_rates for r in res])
            else:
                picks = np.array([(r.chosen, r.rejected) for r in res], dtype=float)
            entry = out.setdefault(way, {"times": []})
            entry["times"].append(1000 * seconds / len(prompts))
            entry["queries"] = sum(r.queries for r in res) / len(prompts)
            entry["sequences"] = (_sequences(oracle) - seq0) / len(prompts)
            entry["picks"] = picks
    for entry in out.values():
        entry["ms"] = float(np.median(entry["times"]))
        entry["ms_min"] = float(np.min(entry["times"]))
    return out


def bench_selection(args: argparse.Namespace) -> list[dict]:
    prompts, samples = _samples(args.prompts, args.k, args.seed)
    repeats = args.repeats
    rows = []
    for size in args.sizes:
        hidden, layers = (int(v) for v in size.split("x"))
        rows += _bench_size(prompts, samples, hidden, layers, repeats)
    return rows


def _bench_size(prompts, samples, hidden: int, layers: int, repeats: int) -> list[dict]:
    from inpo.oracles.pairwise import PairwisePreferenceOracle
    from inpo.oracles.reward_model import RewardModelOracle

    rows = []
    size = f"{hidden}×{layers}"
    with tempfile.TemporaryDirectory() as tmp:
        rm_path, pm_path = _build_models(Path(tmp), hidden, layers)
        rms = {b: RewardModelOracle(rm_path, batch_size=b, device="cpu") for b in (1, 32)}
        pms = {b: PairwisePreferenceOracle(pm_path, batch_size=b, device="cpu") for b in (1, 32)}
        plan = [
            ("reward model", rms, "tournament"),
            ("reward model", rms, "best/worst-of-K"),
            ("reward model", rms, "all-pairs win rates"),
            ("pairwise model", pms, "tournament"),
            ("pairwise model", pms, "all-pairs win rates"),
        ]
        for model, oracles, rule in plan:
            result = _run_rule(oracles.__getitem__, rule, prompts, samples, repeats)
            same = bool(np.allclose(result["batched"]["picks"], result["one-by-one"]["picks"]))
            rows.append({"size": size, "model": model, "rule": rule, "same": same, **result})
            b, o = result["batched"], result["one-by-one"]
            print(f"{size} {model:15s} {rule:20s} batched {b['ms']:.1f} ms/prompt, one-by-one "
                  f"{o['ms']:.1f} ms/prompt, same picks: {same}", file=sys.stderr)  # fmt: skip
    return rows


class _ServerProcess:
    """``inpo serve-oracle --oracle table`` in a subprocess (its own interpreter and GIL)."""

    def __init__(self, folder: Path, delay_s: float) -> None:
        import subprocess

        cmd = [sys.executable, "-m", "inpo", "serve-oracle", "--oracle", "table", "--port", "0"]
        cmd += ["--matrix", str(folder / "P.npy"), "--responses", str(folder / "r.json")]
        cmd += ["--served-model-name", "table", "--fault-delay-s", str(delay_s)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stderr.readline()
        if " on http" not in line:
            self.proc.kill()
            raise RuntimeError(f"inpo serve-oracle did not start: {line!r}")
        self.url = line.split(" on ")[1].split()[0]
        self.model_name = "table"

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/health").json()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class _ServerThread:
    """The same server on a thread of this process (shares the client's GIL)."""

    def __init__(self, table, delay_s: float) -> None:
        from inpo.oracles.server import FaultInjection, OracleServer

        self.server = OracleServer(table, port=0, faults=FaultInjection(delay_s=delay_s)).start()
        self.url, self.model_name = self.server.url, self.server.model_name

    def health(self) -> dict:
        return self.server.health()

    def close(self) -> None:
        self.server.shutdown()


def bench_http(levels: Sequence[int], n_pairs: int, delay_s: float) -> list[dict]:
    import json

    from inpo.oracles.http import HTTPJudgeOracle
    from inpo.oracles.synthetic import TableOracle

    k = 16
    rng = np.random.default_rng(0)
    responses = [f"response number {i}: " + "x" * int(rng.integers(10, 200)) for i in range(k)]
    p = np.full((k, k), 0.5)
    iu = np.triu_indices(k, 1)
    p[iu] = rng.uniform(0.05, 0.95, size=len(iu[0]))
    p.T[iu] = 1.0 - p[iu]
    ii = rng.integers(0, k, size=n_pairs)
    jj = rng.integers(0, k, size=n_pairs)
    args = (["a prompt"] * n_pairs, [responses[i] for i in ii], [responses[j] for j in jj])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "P.npy", p)
        (Path(tmp) / "r.json").write_text(json.dumps(responses))
        for where in ("process", "thread"):
            server = (
                _ServerProcess(Path(tmp), delay_s)
                if where == "process"
                else _ServerThread(TableOracle(p, responses), delay_s)
            )
            try:
                for c in levels:
                    judge = HTTPJudgeOracle(
                        server.url, server.model_name, api_key_env=None, concurrency=c
                    )
                    judge.prob_prefers(*(a[:2] for a in args))  # warm the connection pool
                    requests0 = server.health()["requests"]
                    t0 = time.perf_counter()
                    got = judge.prob_prefers(*args)
                    seconds = time.perf_counter() - t0
                    judge.close()
                    health = server.health()
                    assert np.allclose(got, p[ii, jj], atol=1e-9)
                    sent = health["requests"] - requests0
                    rows.append({
                        "server": where,
                        "concurrency": c,
                        "pairs": n_pairs,
                        "requests": sent,
                        "seconds": seconds,
                        "qps": n_pairs / seconds,
                        "rps": sent / seconds,
                        "max_in_flight": health["max_in_flight"],
                    })  # fmt: skip
                    print(f"http {where} c={c}: {n_pairs / seconds:.1f} queries/s", file=sys.stderr)
            finally:
                server.close()
    return rows


def _markdown(args, sel_rows: list[dict], http_rows: list[dict], wall: float) -> str:
    import torch

    lines = [
        "# Oracle cost: selection rules on model oracles, HTTP judge throughput",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other work), "
        f"torch {torch.__version__} CPU, {torch.get_num_threads()} threads, float32; "
        f"Python {platform.python_version()}",
        f"- Command: `{' '.join(['python', 'benchmarks/oracles.py', *sys.argv[1:]])}`",
        f"- Total wall time: {wall:.0f} s",
        "",
        "## 1. Selection rules on tiny model oracles",
        "",
        f"{args.prompts} prompts × K = {args.k} responses (20–120 characters); tiny Llama "
        "(size = hidden × layers, char vocabulary) as a Bradley–Terry reward model and as a "
        "pairwise (RLHFlow-format) preference model. *batched*: `tournament_batch` / "
        "`best_worst_by_reward_batch` / `win_rates_batch` over all prompts, model batch 32. "
        "*one-by-one* (baseline): the per-prompt function, each query its own `prob_prefers` "
        "call, model batch 1. Queries = pairwise oracle queries a prompt (reward evaluations for "
        "best/worst); forward seqs = sequences through the model a prompt. Times: median "
        f"(min) of {args.repeats} runs, the two ways alternating.",
        "",
        "| size | oracle | rule | queries / prompt | forward seqs / prompt | one-by-one ms / prompt "
        "| batched ms / prompt | speed-up | same pairs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sel_rows:
        b, o = r["batched"], r["one-by-one"]
        assert b["queries"] == o["queries"]
        lines.append(
            f"| {r['size']} | {r['model']} | {r['rule']} | {b['queries']:g} | {b['sequences']:g} "
            f"| {o['ms']:.1f} ({o['ms_min']:.1f}) | {b['ms']:.1f} ({b['ms_min']:.1f}) "
            f"| {o['ms'] / b['ms']:.1f}× | "
            f"{'yes' if r['same'] else '**no**'} |"
        )
    lines += [
        "",
        "Reading: the reward model scores each response once (`K` forward sequences a prompt "
        "whatever the rule, thanks to its per-response cache), so the tournament's saving over "
        "all pairs is in oracle queries, not model time; the pairwise model pays two forward "
        "sequences (both orders) per query, so there the tournament's "
        f"`3K/2 − 1 = {3 * args.k // 2 - 1}` queries against `K(K−1)/2 = "
        f"{args.k * (args.k - 1) // 2}` are model time too. Batching (one `prob_prefers` call "
        "per round across prompts, model batch 32, length-bucketed) removes per-call overhead, "
        "which is what the small models show; for the larger one a single-threaded CPU forward "
        "is compute-bound (its cost is linear in tokens whether batched or not), so batching "
        "gains little on this machine. The gain batching is for, filling a GPU, is not measured "
        "here (no GPU in this environment).",
        "",
        "## 2. HTTP judge throughput against `inpo serve-oracle`",
        "",
        f"Loopback, a table oracle behind the server, {1000 * args.delay:.0f} ms server-side "
        f"delay per request (test-only `FaultInjection.delay_s`, to mimic a model), "
        f"{args.pairs} pairwise queries = {2 * args.pairs} requests (both orders), log-prob "
        "verdicts checked against the table. The server runs either as its own process (the "
        "real `inpo serve-oracle` command, as deployed) or on a thread of the client's process "
        "(sharing its GIL). Baseline: concurrency 1.",
        "",
        "| server | concurrency | queries/s | requests/s | seconds | vs the first level "
        "| max in flight (cumulative) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in http_rows:
        base = next(x["qps"] for x in http_rows if x["server"] == r["server"])
        where = (
            "`inpo serve-oracle` process" if r["server"] == "process" else "thread, same process"
        )
        lines.append(
            f"| {where} | {r['concurrency']} | {r['qps']:.1f} | {r['rps']:.1f} "
            f"| {r['seconds']:.2f} | {r['qps'] / base:.1f}× | {r['max_in_flight']} |"
        )
    ideal = 1.0 / (2 * args.delay)
    lines += [
        "",
        f"With a {1000 * args.delay:.0f} ms model, one worker can do at most {ideal:.0f} "
        "queries/s (two requests each); the gap to `concurrency × that` is client and server "
        "overhead in Python threads on two shared cores (load average 5–8 from other jobs while "
        "this ran: the concurrency-16 rows vary by up to 2× between runs).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=128, help="HTTP pairwise queries per level")
    parser.add_argument("--delay", type=float, default=0.02, help="server delay (s)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per way (median)")
    parser.add_argument(
        "--sizes", nargs="+", default=["64x2", "256x4"], help="tiny models: HIDDENxLAYERS"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)  # tiny models: one thread is steadier on shared cores
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    sel_rows = bench_selection(args)
    http_rows = bench_http(args.levels, args.pairs, args.delay)
    text = _markdown(args, sel_rows, http_rows, time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
