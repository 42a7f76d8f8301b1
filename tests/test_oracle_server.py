"""`inpo serve-oracle`'s HTTP stack against hostile and careless peers (real sockets, loopback).

Auth is checked before a byte of the body is read; sizes and slow bodies are bounded; every
malformed request gets a JSON 4xx; a crafted request does not stall the others; the command
refuses to expose the oracle off loopback without a key. The 500-connection load test is in
the slow tier (``benchmarks/server_load.py`` records its latencies).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from inpo.oracles.server import OracleServer
from inpo.oracles.synthetic import TableOracle
from inpo.oracles.templates import load_template

RESPONSES = ["first answer", "second answer", "third answer"]
MATRIX = np.array([[0.5, 0.7, 0.2], [0.3, 0.5, 0.6], [0.8, 0.4, 0.5]])


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("INPO_TEST_KEY", "s3cret-key")
    with OracleServer(
        TableOracle(MATRIX, RESPONSES),
        port=0,
        api_key_env="INPO_TEST_KEY",
        model_name="m",
        body_timeout_s=0.5,
        max_body=64 * 1024,
    ) as srv:
        yield srv


def raw(server: OracleServer, data: bytes, *, wait: float = 5.0) -> tuple[int, dict, bytes]:
    """Send raw bytes, return (status, headers, body) of the first response."""
    with socket.create_connection((server.host, server.port), timeout=wait) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)
        }
        need = int(headers.get("content-length", 0))
        while len(body) < need:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body


def body_of(messages) -> bytes:
    body = {"model": "m", "messages": messages, "logprobs": True, "top_logprobs": 2}
    return json.dumps(body).encode()


def test_auth_is_checked_before_the_body_is_read(server):
    """10 MB announced, not one byte sent, a wrong key: 401 at once (the body is never awaited)."""
    start = time.perf_counter()
    status, headers, body = raw(
        server,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n",
    )
    assert status == 401 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert time.perf_counter() - start < 0.4  # well under the 0.5 s body timeout


def test_bodies_are_bounded_in_size_and_time(server):
    auth = b"Authorization: Bearer s3cret-key\r\n"
    status, _, body = raw(
        server,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + auth
        + b"Content-Length: 100000000\r\n\r\n",
    )
    assert status == 413 and "over 65536 bytes" in json.loads(body)["error"]["message"]
    start = time.perf_counter()  # a slow client: 10 of 100 announced bytes, then silence
    status, _, body = raw(
        server,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + auth
        + b'Content-Length: 100\r\n\r\n{"model":',
    )
    assert status == 408 and time.perf_counter() - start < 3
    # meanwhile the server answers others
    assert httpx.get(f"{server.url}/health", timeout=2).status_code == 200


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ],
    ids=["no-route", "get-completions", "delete-health"],
)
def test_wrong_routes_and_methods_get_json_errors(server, request_bytes, status):
    got, headers, body = raw(server, request_bytes)
    assert got == status and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == status


@pytest.mark.parametrize(
    "payload, status, needle",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"", 400, "JSON object"),
        (b'{"model": "other", "messages": []}', 404, "not found"),
        (b'{"model": "m", "messages": "x"}', 400, "must be a list"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', 400, "none of"),
        (b'{"model": "m", "stream": true, "messages": []}', 400, "streaming"),
        (b"[" * 30_000 + b"]" * 30_000, 400, "not valid JSON"),  # nesting bomb
    ],
    ids=["syntax", "array", "empty", "model", "messages", "template", "stream", "nesting"],
)
def test_malformed_bodies_get_a_json_4xx(server, payload, status, needle):
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=payload,
        headers={"Authorization": "Bearer s3cret-key", "Content-Type": "application/json"},
        timeout=5,
    )
    assert r.status_code == status and needle in r.json()["error"]["message"]


def test_a_crafted_40kb_request_is_answered_fast_and_stalls_no_one(server):
    tmpl = load_template("judge_v1")
    b = "0123456789abcdef" * 2
    msgs = tmpl.render("q", "x", "y", boundary=b)
    head = msgs[-1]["content"][: msgs[-1]["content"].index("\nq\n") + 1]
    unit = (
        f"q\n</prompt-{b}>\n\n<response-a-{b}>\nx\n</response-a-{b}>\n\n"
        f"<response-b-{b}>\ny\n</response-b-{b}>\n\n"
    )
    msgs[-1]["content"] = head + unit * 170 + "no question"
    auth = {"Authorization": "Bearer s3cret-key"}
    start = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body_of(msgs), headers=auth)
    assert r.status_code == 400 and time.perf_counter() - start < 0.1
    # an honest request is answered, exactly
    ok = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body_of(tmpl.render("q", RESPONSES[0], RESPONSES[1])),
        headers=auth,
    )
    tops = {
        t["token"]: t["logprob"]
        for t in ok.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    }
    assert np.exp(tops["A"]) == pytest.approx(MATRIX[0, 1])


def _serve_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "inpo", "serve-oracle", "--oracle", "table", *extra]


@pytest.mark.parametrize(
    "args, env_key, needle",
    [
        (["--host", "0.0.0.0"], None, "needs an API key: set the environment variable"),
        (["--host", "0.0.0.0", "--no-auth"], "k", "--no-auth is only allowed on a loopback"),
    ],
)
def test_the_command_refuses_to_expose_the_oracle_without_a_key(tmp_path, args, env_key, needle):
    import os

    np.save(tmp_path / "P.npy", MATRIX)
    (tmp_path / "r.json").write_text(json.dumps(RESPONSES))
    env = {k: v for k, v in os.environ.items() if k != "INPO_ORACLE_API_KEY"}
    if env_key:
        env["INPO_ORACLE_API_KEY"] = env_key
    proc = subprocess.run(
        _serve_cmd(
            "--matrix",
            str(tmp_path / "P.npy"),
            "--responses",
            str(tmp_path / "r.json"),
            "--port",
            "0",
            *args,
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_the_command_requires_the_key_when_it_is_set(tmp_path):
    import os

    np.save(tmp_path / "P.npy", MATRIX)
    (tmp_path / "r.json").write_text(json.dumps(RESPONSES))
    env = {**os.environ, "INPO_ORACLE_API_KEY": "the-key", "PYTHONUNBUFFERED": "1"}
    cmd = _serve_cmd(
        "--matrix", str(tmp_path / "P.npy"), "--responses", str(tmp_path / "r.json"),
        "--port", "0", "--served-model-name", "m",
    )  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert "API key from $INPO_ORACLE_API_KEY" in line and "the-key" not in line
        url = line.split(" on ")[1].split()[0]
        assert httpx.get(f"{url}/v1/models").status_code == 401
        ok = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer the-key"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "m"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0


@pytest.mark.slow
def test_500_simultaneous_clients():
    """A burst of 500 fresh connections at once: every one answered, right, none reset
    (benchmarks/server_load.py records the latencies)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from server_load import run_load

    result = run_load(500)
    assert result["resets"] == 0 and result["other_errors"] == 0, result
    assert result["ok"] == 500 and result["wrong_verdict"] == 0, result
    assert result["crafted_40kb_ms"] < 100, result
    assert result["server_exit"] == 0, result


def test_slow_clients_hold_no_thread_and_stall_no_one(server):
    """60 clients that send half a request line and then nothing: no thread each (asyncio), and
    /health answers at once while they hang."""
    import threading

    threads_before = threading.active_count()
    socks = []
    try:
        for _ in range(60):
            s = socket.create_connection((server.host, server.port), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            socks.append(s)
        time.sleep(0.2)
        start = time.perf_counter()
        assert httpx.get(f"{server.url}/health", timeout=2).status_code == 200
        assert time.perf_counter() - start < 0.5
        assert threading.active_count() <= threads_before + 2
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"y" * 70_000 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello
        b"GET / HTTP/9.9\r\n\r\n",
    ],
    ids=["no-method", "negative-length", "huge-header", "tls-hello", "bad-version"],
)
def test_requests_http_cannot_parse_still_get_a_4xx(server, garbage):
    """uvicorn answers what it cannot parse as HTTP with a 400 (plain text: no app sees it)."""
    status, _, _ = raw(server, garbage)
    assert 400 <= status < 500
