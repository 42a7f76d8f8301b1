"""Serve any local preference oracle over an OpenAI-compatible HTTP surface.

Many workers can then annotate against one model (``inpo serve-oracle``), each using
:class:`inpo.oracles.http.HTTPJudgeOracle`. Endpoints:

- ``POST /v1/chat/completions`` — the request must follow a judge template
  (:mod:`inpo.oracles.templates`, the same module the client renders with); the server recovers
  the prompt and the two responses *exactly*, asks the local oracle for ``P = P(A ≻ B)`` (both
  presentation orders are the client's job) and answers ``"A"`` if ``P ≥ ½`` else ``"B"``; with
  ``logprobs: true`` it adds ``logprobs.content[0].top_logprobs`` for ``"A"`` and ``"B"``:
  ``log P`` and ``log(1 − P)``, ``P`` clipped to ``[1e-12, 1 − 1e-12]``.
- ``GET /v1/models`` — the one served model (named by the oracle id unless told otherwise).
- ``GET /health`` — ``{"status": "ok", ...}`` with the oracle's query counters.

The HTTP stack is uvicorn (asyncio; one task per connection, not a thread) running a Starlette
app: a listen backlog of 2048, a cap on concurrent connections (``limit_concurrency``; 503
beyond it), idle keep-alive connections closed after 5 s, a bounded request body read within
``body_timeout_s``. With an API key, ``Authorization: Bearer <key>`` is checked before a byte of
the body is read. Every error is a JSON body ``{"error": {"message", "type", "code"}}`` with a
4xx/5xx status. Request data never meets a regular expression (template parsing is a linear
scan). Concurrent queries are gathered by one worker thread into batches of up to
``max_batch`` (one ``prob_prefers`` call each), which also serialises access to the oracle.

:class:`FaultInjection` holds TEST-ONLY knobs (delays, failing status codes, malformed JSON,
unusable verdicts) used by the client's failure-mode tests and the throughput benchmark.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inpo.errors import ConfigError, InpoError
from inpo.oracles.base import PreferenceOracle
from inpo.oracles.templates import (
    VERDICT_A,
    VERDICT_B,
    JudgeTemplate,
    TemplateMismatchError,
    available_templates,
    load_template,
)

__all__ = ["EPS", "LOOPBACK", "FaultInjection", "OracleServer"]

log = logging.getLogger(__name__)

#: Probabilities are clipped to [EPS, 1 − EPS] before taking logs.
EPS = 1e-12
#: Hosts that only this machine reaches.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class FaultInjection:
    """TEST-ONLY fault injection for :class:`OracleServer` (never use in production).

    Chat-completion requests are numbered 0, 1, 2, ... in arrival order; each knob applies to
    the first ``n`` of them.

    Attributes:
        delay_s: sleep this long before answering (mimics a slow model, or provokes timeouts).
        delay_first_n: only delay the first ``n`` requests (``-1``: every request).
        fail_first_n: answer the first ``n`` requests with HTTP ``fail_status``.
        fail_status: the status code of those failures (e.g. 500, 503, 429, 400).
        retry_after_s: send ``Retry-After`` with that many seconds on the failures.
        malformed_json_first_n: answer the first ``n`` with a truncated JSON body (status 200).
        bad_verdict_first_n: answer the first ``n`` with the verdict "C" and no log-probs.
        fail_after_n: answer every request from number ``n`` on with HTTP ``fail_status`` (a
            judge that dies part-way; ``-1``: never).
    """

    delay_s: float = 0.0
    delay_first_n: int = -1
    fail_first_n: int = 0
    fail_status: int = 500
    retry_after_s: float | None = None
    malformed_json_first_n: int = 0
    bad_verdict_first_n: int = 0
    fail_after_n: int = -1


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class _Batcher:
    """One worker thread that answers queued queries in batches (one oracle call a batch)."""

    def __init__(self, oracle: PreferenceOracle, max_batch: int, wait_s: float) -> None:
        self.oracle, self.max_batch, self.wait_s = oracle, max_batch, wait_s
        self.batches = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="inpo-oracle-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt: str, a: str, b: str) -> Future:
        """Queue one query; the future resolves to its ``P`` (or the oracle's exception)."""
        future: Future = Future()
        self._queue.put((prompt, a, b, future))
        return future

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            self._answer(batch)

    def _answer(self, batch: list) -> None:
        try:
            probs = self.oracle.prob_prefers(
                [q[0] for q in batch], [q[1] for q in batch], [q[2] for q in batch]
            )
            self.batches += 1
            for q, p in zip(batch, probs, strict=True):
                q[3].set_result(float(p))
        except Exception as err:
            if len(batch) == 1:
                batch[0][3].set_exception(err)
                return
            for q in batch:  # one bad query must not fail the other clients' queries
                self._answer([q])


class OracleServer:
    """An HTTP server exposing ``oracle`` with an OpenAI-compatible surface (uvicorn).

    Args:
        oracle: any :class:`~inpo.oracles.base.PreferenceOracle`.
        host, port: where to listen (``port=0`` picks a free port; see :attr:`port`). The socket
            is bound here, so a taken port is a :class:`ConfigError` at once.
        templates: judge template names/paths accepted (default: all shipped templates).
        model_name: the served model name (default: the oracle's ``oracle_id``).
        api_key_env: if set, require ``Authorization: Bearer $api_key_env`` (checked before the
            body is read). The key is read from the environment once, never logged.
        emit_logprobs: return log-probs when asked (``False``: text-only answers, like a
            server without log-prob support).
        max_batch, batch_wait_s: gather up to ``max_batch`` concurrent queries, waiting at most
            ``batch_wait_s`` for more after the first.
        max_body: the largest request body accepted (413 beyond).
        body_timeout_s: the body must arrive within this many seconds (408 otherwise).
        limit_concurrency: connections and requests served at once (503 beyond).
        backlog: the listen backlog (connections the kernel queues before ``accept``).
        faults: TEST-ONLY :class:`FaultInjection`.
    """

    def __init__(
        self,
        oracle: PreferenceOracle,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        templates: Sequence[str | Path] | None = None,
        model_name: str | None = None,
        api_key_env: str | None = None,
        emit_logprobs: bool = True,
        max_batch: int = 64,
        batch_wait_s: float = 0.002,
        max_body: int = 4 * 2**20,
        body_timeout_s: float = 30.0,
        limit_concurrency: int = 4096,
        backlog: int = 2048,
        faults: FaultInjection | None = None,
    ) -> None:
        self.oracle = oracle
        names = list(templates) if templates is not None else available_templates()
        self.templates: list[JudgeTemplate] = [load_template(t) for t in names]
        self.model_name = model_name or str(getattr(oracle, "oracle_id", type(oracle).__name__))
        self._secret: str | None = None
        if api_key_env:
            self._secret = os.environ.get(api_key_env)
            if not self._secret:
                raise ConfigError(
                    f"--api-key-env {api_key_env}: the environment variable is not set or empty"
                )
        self.emit_logprobs = emit_logprobs
        self.max_body = int(max_body)
        self.body_timeout_s = float(body_timeout_s)
        self.faults = faults or FaultInjection()
        self.requests = 0  # chat-completion requests received
        self.in_flight = 0  # chat-completion requests being answered now
        self.max_in_flight = 0  # the most answered at once (shows client concurrency)
        self._count_lock = threading.Lock()
        self._sock = _listen(host, port, backlog)
        self._batcher = _Batcher(oracle, max_batch, batch_wait_s)
        self._uvicorn = _uvicorn_server(self._app(), limit_concurrency, backlog)
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----
    @property
    def host(self) -> str:
        return str(self._sock.getsockname()[0])

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve on this thread until :meth:`shutdown`, Ctrl-C or SIGTERM."""
        self._uvicorn.run(sockets=[self._sock])

    def start(self) -> OracleServer:
        """Serve on a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="inpo-oracle-server")
        self._thread.daemon = True
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise InpoError(f"the oracle server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._sock.close()
        self._batcher.stop()

    def __enter__(self) -> OracleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- request logic ----
    def check_auth(self, header: str | None) -> None:
        if self._secret is None:
            return
        expected = f"Bearer {self._secret}".encode()
        if not header or not hmac.compare_digest(header.encode(), expected):
            raise _HTTPError(401, "missing or wrong API key", "authentication_error")

    def _number(self) -> int:
        with self._count_lock:
            self.requests += 1
            return self.requests - 1

    def _enter(self, delta: int) -> None:
        with self._count_lock:
            self.in_flight += delta
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def parse_request(self, body: Any) -> tuple[str, str, str]:
        if not isinstance(body, dict):
            raise _HTTPError(400, "the request body must be a JSON object")
        if body.get("stream"):
            raise _HTTPError(400, "streaming is not supported by inpo serve-oracle")
        model = body.get("model")
        if model != self.model_name:
            raise _HTTPError(
                404, f"model {str(model)[:100]!r} not found; this server serves {self.model_name!r}"
            )
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise _HTTPError(400, "'messages' must be a list")
        problems = []
        for tmpl in self.templates:
            try:
                return tmpl.parse(messages)
            except TemplateMismatchError as err:
                problems.append(f"{tmpl.template_id}: {err}")
        raise _HTTPError(
            400, "the messages follow none of the judge templates (" + "; ".join(problems) + ")"
        )

    async def complete(self, body: Any, number: int) -> dict[str, Any]:
        prompt, a, b = self.parse_request(body)
        try:
            p = await asyncio.wrap_future(self._batcher.submit(prompt, a, b))
        except (InpoError, ValueError, KeyError) as err:
            raise _HTTPError(400, f"the oracle rejected the query: {err}") from err
        except Exception as err:
            msg = f"the oracle failed: {type(err).__name__}: {err}"
            raise _HTTPError(500, msg, "server_error") from err
        if not math.isfinite(p) or not 0.0 <= p <= 1.0:
            raise _HTTPError(500, f"the oracle returned P = {p!r}", "server_error")
        verdict = VERDICT_A if p >= 0.5 else VERDICT_B
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": verdict},
            "logprobs": None,
            "finish_reason": "stop",
        }
        if number < self.faults.bad_verdict_first_n:
            choice["message"]["content"] = "C"
        elif self.emit_logprobs and body.get("logprobs"):
            clipped = min(max(p, EPS), 1.0 - EPS)
            lp = {VERDICT_A: math.log(clipped), VERDICT_B: math.log1p(-clipped)}
            k = body.get("top_logprobs") or 0
            k = max(0, min(int(k), 2)) if isinstance(k, int | float) else 0
            top = sorted(lp, key=lambda t: -lp[t])[:k]
            choice["logprobs"] = {
                "content": [
                    {
                        "token": verdict,
                        "logprob": lp[verdict],
                        "bytes": list(verdict.encode()),
                        "top_logprobs": [
                            {"token": t, "logprob": lp[t], "bytes": list(t.encode())} for t in top
                        ],
                    }
                ]
            }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
        }

    def health(self) -> dict[str, Any]:
        stats = getattr(self.oracle, "stats", None)
        return {
            "status": "ok",
            "model": self.model_name,
            "templates": [t.template_id for t in self.templates],
            "requests": self.requests,
            "max_in_flight": self.max_in_flight,
            "batches": self._batcher.batches,
            "oracle_stats": stats.as_dict() if stats is not None else {},
        }

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "inpo"}],
        }

    # ---- the ASGI app ----
    async def _read_body(self, request: Any) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body:
                    raise _HTTPError(413, f"request body over {self.max_body} bytes")
            except ValueError:
                raise _HTTPError(400, "Content-Length is not a number") from None
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    raise _HTTPError(413, f"request body over {self.max_body} bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.body_timeout_s)
        except TimeoutError:
            raise _HTTPError(
                408, f"the body did not arrive within {self.body_timeout_s:g}s"
            ) from None
        return b"".join(chunks)

    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        def error(status: int, message: str, kind: str, headers: dict | None = None) -> Any:
            body = {"error": {"message": message, "type": kind, "code": status}}
            return JSONResponse(body, status_code=status, headers=headers)

        async def health(request: Any) -> Any:
            return JSONResponse(self.health())

        async def models(request: Any) -> Any:
            try:
                self.check_auth(request.headers.get("authorization"))
            except _HTTPError as err:
                return error(err.status, err.message, err.kind)
            return JSONResponse(self.models())

        async def completions(request: Any) -> Any:
            try:
                self.check_auth(request.headers.get("authorization"))  # before the body
                raw = await self._read_body(request)
            except _HTTPError as err:
                return error(err.status, err.message, err.kind)
            number = self._number()
            self._enter(+1)
            try:
                faults = self.faults
                if faults.delay_s > 0 and (
                    faults.delay_first_n < 0 or number < faults.delay_first_n
                ):
                    await asyncio.sleep(faults.delay_s)
                if number < faults.fail_first_n or 0 <= faults.fail_after_n <= number:
                    headers = {}
                    if faults.retry_after_s is not None:
                        headers["Retry-After"] = f"{faults.retry_after_s:g}"
                    return error(
                        faults.fail_status, f"injected failure #{number}", "injected_fault", headers
                    )
                if number < faults.malformed_json_first_n:
                    return Response(
                        b'{"id": "chatcmpl-broken", "choices": [{"message": ',
                        media_type="application/json",
                    )
                try:
                    body = json.loads(raw or b"null")
                except (ValueError, RecursionError):
                    return error(400, "the request body is not valid JSON", "invalid_request_error")
                try:
                    return JSONResponse(await self.complete(body, number))
                except _HTTPError as err:
                    log.info("request %d: HTTP %d: %s", number, err.status, err.message)
                    return error(err.status, err.message, err.kind)
            finally:
                self._enter(-1)

        async def http_error(request: Any, exc: Any) -> Any:  # 404, 405 as JSON too
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            detail = f"no route {request.method} {request.url.path}"
            return error(exc.status_code, detail, kind, getattr(exc, "headers", None))

        async def server_error(request: Any, exc: Exception) -> Any:
            log.exception("unexpected error answering %s", request.url.path)
            return error(500, f"internal error: {type(exc).__name__}", "server_error")

        return Starlette(
            routes=[
                Route("/health", health, methods=["GET"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/v1/chat/completions", completions, methods=["POST"]),
            ],
            exception_handlers={HTTPException: http_error, Exception: server_error},
        )


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err}") from err
    sock.setblocking(False)
    return sock


def _uvicorn_server(app: Any, limit_concurrency: int, backlog: int) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        access_log=False,  # an access log line would carry nothing secret, but is noise
        server_header=False,
        limit_concurrency=limit_concurrency,
        backlog=backlog,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        h11_max_incomplete_event_size=64 * 1024,  # the request line and headers
    )
    return uvicorn.Server(config)
