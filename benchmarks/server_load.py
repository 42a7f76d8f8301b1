"""`inpo serve-oracle` under a burst: N clients connect at once and each asks one judgement.

The server (uvicorn, a table oracle, on 127.0.0.1) runs in its own process; N asyncio clients
open their connections in the same instant (each a fresh TCP connection, so the listen backlog
is exercised), send one ``POST /v1/chat/completions`` rendered with the judge template, and read
the answer. Counted: answers with status 200 and the right verdict, connection resets/refusals,
other statuses; latency from connect to the full answer (p50, p99, max). Also one crafted 40 KB
request (the shape that made the old parser backtrack), timed alone.

Usage::

    python benchmarks/server_load.py                # 500 clients; writes results/server_load.md
    python benchmarks/server_load.py --clients 200  # (not written)

The slow test ``tests/test_oracle_server.py::test_500_simultaneous_clients`` runs
:func:`run_load` and asserts 0 resets and 0 wrong answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "server_load.md"
RESPONSES = [f"response number {i}" for i in range(8)]


def _matrix() -> np.ndarray:
    rng = np.random.default_rng(0)
    p = np.full((8, 8), 0.5)
    iu = np.triu_indices(8, 1)
    p[iu] = rng.uniform(0.05, 0.95, size=len(iu[0]))
    p.T[iu] = 1.0 - p[iu]
    return p


def start_server(work: Path) -> tuple[subprocess.Popen, str]:
    np.save(work / "P.npy", _matrix())
    (work / "r.json").write_text(json.dumps(RESPONSES))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("INPO_ORACLE_API_KEY", None)
    cmd = [sys.executable, "-m", "inpo", "serve-oracle", "--oracle", "table"]
    cmd += ["--matrix", str(work / "P.npy"), "--responses", str(work / "r.json")]
    cmd += ["--port", "0", "--served-model-name", "load"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stderr.readline()
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()[-2000:]}")
    return proc, line.split(" on ")[1].split()[0]


def _request(host: str, port: int, body: bytes) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


async def _one(host: str, port: int, payload: bytes, start: asyncio.Event) -> tuple:
    await start.wait()
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(payload)
        await writer.drain()
        data = await reader.read()  # Connection: close → until EOF
        writer.close()
    except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError) as err:
        return "reset", time.perf_counter() - t0, type(err).__name__
    except OSError as err:
        return "error", time.perf_counter() - t0, f"{type(err).__name__}: {err}"
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return "reset", time.perf_counter() - t0, "empty answer"
    status = int(head.split(b" ", 2)[1])
    verdict = None
    if status == 200:
        verdict = json.loads(body)["choices"][0]["message"]["content"]
    return status, time.perf_counter() - t0, verdict


async def _burst(url: str, n: int) -> list[tuple]:
    from inpo.oracles.templates import load_template

    host, port = url.removeprefix("http://").rsplit(":", 1)
    tmpl = load_template("judge_v1")
    start = asyncio.Event()
    tasks, expected = [], []
    p = _matrix()
    for k in range(n):
        i, j = k % 8, (k * 3 + 1) % 8
        if i == j:
            j = (j + 1) % 8
        body = {"model": "load", "messages": tmpl.render("q", RESPONSES[i], RESPONSES[j])}
        payload = _request(host, int(port), json.dumps(body).encode())
        tasks.append(asyncio.create_task(_one(host, int(port), payload, start)))
        expected.append("A" if p[i, j] >= 0.5 else "B")
    await asyncio.sleep(0.05)
    start.set()
    results = await asyncio.gather(*tasks)
    return [(*r, e) for r, e in zip(results, expected, strict=True)]


def crafted_request_seconds(url: str) -> float:
    import httpx

    from inpo.oracles.templates import load_template

    tmpl = load_template("judge_v1")
    b = "0123456789abcdef" * 2
    msgs = tmpl.render("q", "x", "y", boundary=b)
    head = msgs[-1]["content"][: msgs[-1]["content"].index("\nq\n") + 1]
    unit = (
        f"q\n</prompt-{b}>\n\n<response-a-{b}>\nx\n</response-a-{b}>\n\n"
        f"<response-b-{b}>\ny\n</response-b-{b}>\n\n"
    )
    msgs[-1]["content"] = head + unit * 170 + "no question"
    payload = json.dumps({"model": "load", "messages": msgs}).encode()
    with httpx.Client() as client:  # built (and connected) before the clock starts
        client.get(f"{url}/health")
        t0 = time.perf_counter()
        r = client.post(f"{url}/v1/chat/completions", content=payload)
        seconds = time.perf_counter() - t0
    assert r.status_code == 400, r.text
    return seconds


def run_load(n: int = 500) -> dict:
    """Start a server, fire ``n`` simultaneous clients, stop it; the counts and latencies."""
    with tempfile.TemporaryDirectory(prefix="inpo-load-") as tmp:
        proc, url = start_server(Path(tmp))
        try:
            results = asyncio.run(_burst(url, n))
            crafted = crafted_request_seconds(url)
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    ok = [r for r in results if r[0] == 200 and r[2] == r[3]]
    lat = np.array([r[1] for r in results])
    return {
        "clients": n,
        "ok": len(ok),
        "wrong_verdict": sum(1 for r in results if r[0] == 200 and r[2] != r[3]),
        "resets": sum(1 for r in results if r[0] == "reset"),
        "other_errors": sum(1 for r in results if r[0] == "error"),
        "statuses": sorted({str(r[0]) for r in results}),
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "max_ms": float(lat.max() * 1e3),
        "crafted_40kb_ms": crafted * 1e3,
        "server_exit": proc.returncode,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    runs = [run_load(args.clients) for _ in range(args.rounds)]
    load1 = os.getloadavg()[0]
    for r in runs:
        print(json.dumps(r))
    if args.clients != 500:
        return
    import uvicorn

    rows = "\n".join(
        f"| {k + 1} | {r['ok']} / {r['clients']} | {r['resets']} | {r['wrong_verdict']} | "
        f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} | {r['crafted_40kb_ms']:.1f} |"
        for k, r in enumerate(runs)
    )
    met = all(r["resets"] == 0 and r["ok"] == r["clients"] for r in runs)
    fast = all(r["crafted_40kb_ms"] < 100 for r in runs)
    RESULTS.write_text(
        f"""# `inpo serve-oracle` under a burst of {args.clients} simultaneous clients

- Date: {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}; 1-minute load
  average {load0:.1f} at the start, {load1:.1f} at the end.
- Versions: uvicorn {uvicorn.__version__}, Python {platform.python_version()}
- Command: `python benchmarks/server_load.py --clients {args.clients} --rounds {args.rounds}`
- Set-up: `inpo serve-oracle --oracle table` (8 responses) on 127.0.0.1 in its own process;
  {args.clients} asyncio clients in one other process, each a fresh TCP connection opened in the
  same instant, one judgement each (`Connection: close`); latency from connect to the whole
  answer. Then one crafted 40 KB request alone, on a connection opened before the clock starts.

| round | right answers | resets | wrong verdicts | p50 ms | p99 ms | max ms | crafted 40 KB ms |
|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}

- Claim "{args.clients} simultaneous clients, 0 resets, every answer right": **{"met" if met else "NOT met"}**.
- Claim "the crafted 40 KB request answered in < 100 ms": **{"met" if fast else "NOT met"}**.
"""
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
