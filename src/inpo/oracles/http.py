"""An LLM judge behind any OpenAI-compatible ``/v1/chat/completions`` endpoint.

Works with vLLM, SGLang, hosted APIs and ``inpo serve-oracle``. Each pair is judged in BOTH
orders (the judge sees a then b, and b then a) and combined with
:func:`inpo.oracles.pairwise.combine_orders` to cancel position bias, so one pairwise query
costs two requests.

The verdict's probability comes from token log-probs when the server returns them (the request
asks ``logprobs: true, top_logprobs: k``): at the first generated position whose top log-probs
hold ``"A"`` or ``"B"`` (surrounding whitespace ignored), ``P_A = p_A / (p_A + p_B)``; a verdict
missing from the top-k counts as probability 0. Without log-probs the answer text is parsed
strictly: after stripping whitespace and punctuation it must be exactly ``A`` or ``B``
(``P_A`` ∈ {1, 0}); anything else is a counted failure, retried, and finally an
:class:`inpo.errors.OracleError` naming the pair and what the server returned (truncated).

Requests run on a thread pool of ``concurrency`` workers sharing one ``httpx.Client``.
Timeouts, connection errors, HTTP 429 (``Retry-After`` honoured) and 5xx are retried up to
``max_retries`` times with exponential back-off ``backoff · 2^(attempt−1)`` (capped at
``max_backoff``); malformed JSON and unusable verdicts are retried too; any other 4xx fails at
once. The API key is read from the environment variable ``api_key_env`` when the oracle is built,
sent as ``Authorization: Bearer …``, and never logged, shown in ``repr`` or put in an error
(messages are redacted). Prompts are rendered with a versioned judge template
(:mod:`inpo.oracles.templates`) whose id is part of :attr:`HTTPJudgeOracle.oracle_id`, with
the model name and the verdict mode (log-probs or text; the temperature if not 0). The server URL
is not part of it: replicas of one model share a cache. (``inpo serve-oracle`` names its model
by the served oracle's own id, so that identity carries through.)
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from inpo.data import prompt_text
from inpo.errors import ConfigError, OracleError
from inpo.oracles.base import OracleStats, check_lengths
from inpo.oracles.pairwise import combine_orders
from inpo.oracles.templates import VERDICT_A, VERDICT_B, JudgeTemplate, load_template

__all__ = ["HTTPJudgeOracle", "parse_verdict"]

log = logging.getLogger(__name__)

_SHOW = 200  # characters of a bad answer quoted in errors


class _BadAnswer(Exception):
    """A 200 answer the judge cannot use (no verdict, wrong shape); retried."""


class _Fatal(Exception):
    """A 4xx other than 429: retrying cannot help."""


class _Cancelled(Exception):
    """Another request of the same call failed for good; this one is not sent."""


def _gathered(n: int, answers: Iterator[tuple[int, float]]) -> np.ndarray:
    """The ``[n]`` float64 array of streamed ``(i, P)`` answers."""
    out = np.empty(n, dtype=np.float64)
    for i, p in answers:
        out[i] = p
    return out


def _truncate(text: str, n: int = _SHOW) -> str:
    return repr(text[:n] + ("…" if len(text) > n else ""))


def parse_verdict(data: Any) -> tuple[float, str]:
    """``(P_A, source)`` from a chat-completions JSON body; ``source`` is "logprobs" or "text".

    Raises ``_BadAnswer`` (retried by the oracle) when neither the log-probs nor the text give a
    verdict.
    """
    try:
        choice = data["choices"][0]
        content = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise _BadAnswer(f"unexpected response shape: {_truncate(str(data))}") from err
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    positions = logprobs.get("content") if isinstance(logprobs, dict) else None
    for entry in positions or []:
        if not isinstance(entry, dict):
            break
        mass = {VERDICT_A: 0.0, VERDICT_B: 0.0}
        candidates = list(entry.get("top_logprobs") or [])
        if not candidates and "token" in entry:
            candidates = [entry]
        for cand in candidates:
            if not isinstance(cand, dict):
                raise _BadAnswer(f"malformed top_logprobs entry: {_truncate(str(cand))}")
            token = str(cand.get("token", "")).strip()
            if token in mass:
                try:
                    logprob = float(cand.get("logprob", -math.inf))
                except (TypeError, ValueError):
                    raise _BadAnswer(
                        f"malformed log-prob {_truncate(str(cand.get('logprob')))}"
                    ) from None
                if math.isnan(logprob) or logprob > 1e-6:  # a log-probability is <= 0
                    raise _BadAnswer(f"log-prob {logprob!r} of token {token!r} is not <= 0")
                mass[token] += math.exp(logprob) if logprob > -math.inf else 0.0
        total = mass[VERDICT_A] + mass[VERDICT_B]
        if total > 0 and math.isfinite(total):
            return min(1.0, mass[VERDICT_A] / total), "logprobs"
    # the text verdict: "A" or "B" and nothing else but punctuation and spaces ("**A**.");
    # a linear scan, no regular expression to backtrack on a hostile answer
    letters = "".join(ch for ch in content if ch.isalnum()) if isinstance(content, str) else ""
    if letters not in (VERDICT_A, VERDICT_B):
        raise _BadAnswer(f"the verdict is neither A nor B: {_truncate(str(content))}")
    return (1.0 if letters == VERDICT_A else 0.0), "text"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HTTPJudgeOracle:
    """A preference oracle that asks an OpenAI-compatible chat endpoint which response is better.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000`` or ``https://api.openai.com/v1``.
        model: the served model name sent in each request.
        api_key_env: environment variable holding the API key (``None``: send no key).
        template: a shipped template name (``"judge_v1"``) or a path to a ``.txt`` template.
        concurrency: simultaneous requests.
        timeout: seconds per request (connect, read and write each).
        max_retries: retries after the first attempt (so ``max_retries + 1`` attempts at most).
        backoff: base of the exponential back-off, seconds.
        max_backoff: longest single wait, seconds (also caps ``Retry-After``).
        top_logprobs: how many top log-probs to request; ``0`` asks for none (text verdicts).
        max_tokens: tokens the judge may generate (the verdict is one letter).
        temperature: sampling temperature sent to the server.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        template: str | Path = "judge_v1",
        concurrency: int = 8,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        top_logprobs: int = 5,
        max_tokens: int = 1,
        temperature: float = 0.0,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ConfigError("max_retries must be >= 0, timeout > 0 and backoff >= 0")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url '{base_url}' must start with http:// or https://")
        root = base_url.rstrip("/")
        self.base_url = root
        self.url = (
            f"{root}/chat/completions" if root.endswith("/v1") else f"{root}/v1/chat/completions"
        )
        self.model = model
        self.api_key_env = api_key_env
        self.template: JudgeTemplate = load_template(template)
        self.concurrency = concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.top_logprobs = top_logprobs
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.stats = OracleStats(extra={"logprob_verdicts": 0, "text_verdicts": 0})
        mode = f"logprobs{top_logprobs}" if top_logprobs > 0 else "text"
        if temperature:
            mode += f":T{temperature:g}"
        self.oracle_id = f"http-judge:{model}:{self.template.template_id}:{mode}"
        self._secret = os.environ.get(api_key_env) if api_key_env else None
        self._lock = threading.Lock()
        self._client: Any = None
        self._sleep = time.sleep  # tests replace this to record back-off waits

    @property
    def template_id(self) -> str:
        return self.template.template_id

    def __repr__(self) -> str:
        return (
            f"HTTPJudgeOracle(base_url={self.base_url!r}, model={self.model!r}, "
            f"template={self.template_id!r}, api_key_env={self.api_key_env!r}, "
            f"concurrency={self.concurrency})"
        )

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description for run manifests (never the key itself)."""
        return {
            "kind": "http-judge",
            "oracle_id": self.oracle_id,
            "base_url": self.base_url,
            "model": self.model,
            "template": self.template_id,
            "api_key_env": self.api_key_env,
        }

    # ---- plumbing ----
    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _http(self):
        with self._lock:
            if self._client is None:
                import httpx

                headers = {"Content-Type": "application/json"}
                if self._secret:
                    headers["Authorization"] = f"Bearer {self._secret}"
                self._client = httpx.Client(
                    headers=headers,
                    timeout=httpx.Timeout(self.timeout),
                    limits=httpx.Limits(max_connections=self.concurrency),
                )
            return self._client

    def close(self) -> None:
        """Close the HTTP connection pool (the oracle reopens it on the next query)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> HTTPJudgeOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, key: str, value: int = 1) -> None:
        with self._lock:
            if hasattr(self.stats, key):
                setattr(self.stats, key, getattr(self.stats, key) + value)
            else:
                self.stats.extra[key] = self.stats.extra.get(key, 0) + value

    def _body(self, prompt: Any, first: str, second: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.template.render(prompt_text(prompt), first, second),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.top_logprobs > 0:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        return body

    def _attempt(self, body: dict[str, Any]) -> tuple[float, str] | tuple[None, str, float | None]:
        """One request: ``(P_A, source)`` or ``(None, reason, retry_after)`` if retryable."""
        import httpx

        try:
            resp = self._http().post(self.url, json=body)
        except httpx.TimeoutException:
            return None, f"timed out after {self.timeout:g}s", None
        except httpx.TransportError as err:
            return None, f"connection error ({type(err).__name__}: {err})", None
        except httpx.HTTPError as err:  # e.g. a body that does not decompress (bad gzip)
            return None, f"unreadable response ({type(err).__name__}: {err})", None
        if resp.status_code == 429:
            return None, "HTTP 429 Too Many Requests", _retry_after(resp.headers.get("retry-after"))
        if resp.status_code >= 500:
            return None, f"HTTP {resp.status_code}: {_truncate(resp.text)}", None
        if resp.status_code >= 400:
            hint = ""
            if resp.status_code in (401, 403) and self.api_key_env:
                state = "set" if self._secret else "NOT set"
                hint = f" (API key from ${self.api_key_env}, which is {state})"
            raise _Fatal(f"HTTP {resp.status_code}{hint}: {_truncate(resp.text)}")
        try:
            data = resp.json()
        except ValueError:
            return None, f"malformed JSON: {_truncate(resp.text)}", None
        try:
            return parse_verdict(data)
        except _BadAnswer as err:
            return None, str(err), None

    def _judge(self, label: str, body: dict[str, Any], abort: threading.Event) -> float:
        """``P_A`` for one rendered comparison, with retries; raises OracleError at the end.

        ``abort`` is set when any request of the same call fails for good; the others stop.
        """
        try:
            return self._judge_once(label, body, abort)
        except OracleError:
            abort.set()
            raise

    def _judge_once(self, label: str, body: dict[str, Any], abort: threading.Event) -> float:
        reason = ""
        for attempt in range(self.max_retries + 1):
            if abort.is_set():
                raise _Cancelled
            self._count("backend_calls")
            try:
                result = self._attempt(body)
            except _Fatal as err:
                self._count("failures")
                raise OracleError(
                    self._redact(
                        f"HTTP judge {self.model!r} at {self.url}: {label} "
                        f"was refused, not retried: {err}"
                    )
                ) from None
            if result[0] is not None:
                self._count("logprob_verdicts" if result[1] == "logprobs" else "text_verdicts")
                return float(result[0])
            _, reason, retry_after = result
            self._count("failures")
            if attempt == self.max_retries:
                break
            wait = min(self.max_backoff, self.backoff * 2**attempt)
            if retry_after is not None:
                wait = min(self.max_backoff, max(wait, retry_after))
            log.warning(
                "HTTP judge %s: %s attempt %d failed: %s; retrying in %.3gs",
                self.model,
                label,
                attempt + 1,
                self._redact(reason),
                wait,
            )
            self._count("retries")
            self._sleep(wait)
        raise OracleError(
            self._redact(
                f"HTTP judge {self.model!r} at {self.url}: {label} failed "
                f"after {self.max_retries + 1} attempts; last: {reason}"
            )
        )

    # ---- the protocol ----
    def prob_prefers(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
    ) -> np.ndarray:
        """``P(a_i ≻ b_i) = ½[P_A(a_i, b_i) + 1 − P_A(b_i, a_i)]`` from 2n requests, ``[n]``."""
        n = check_lengths(prompts, responses_a, responses_b)
        return _gathered(n, self.iter_prob_prefers(prompts, responses_a, responses_b))

    def position_probs(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
    ) -> np.ndarray:
        """``P_A(a_i, b_i)``: the judge's preference for ``a_i`` *shown first*, one request a
        pair (``inpo eval`` reads both orders through it to report the position bias), ``[n]``.
        The first failure (after its retries) is raised once the requests in flight end."""
        n = check_lengths(prompts, responses_a, responses_b)
        return _gathered(n, self.iter_position_probs(prompts, responses_a, responses_b))

    def iter_position_probs(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
    ) -> Iterator[tuple[int, float]]:
        """``(i, P_A(a_i, b_i))`` as each request is answered (:meth:`position_probs` one at a
        time), so a cache commits every answer received before a failure; the failure is raised
        after them, the other requests cancelled."""
        n = check_lengths(prompts, responses_a, responses_b)
        jobs = [
            (
                f"pair {i} (prompt {_truncate(str(prompts[i]), 40)}, a shown first)",
                self._body(prompts[i], responses_a[i], responses_b[i]),
            )
            for i in range(n)
        ]
        for j, p in self._answers(jobs):
            self._count("queries")
            yield j, p

    def _answers(self, jobs: list[tuple[str, Any]]) -> Iterator[tuple[int, float]]:
        """``(j, P_A)`` for each job as its request is answered; the first failure (after its
        retries) stops the rest and is raised after the answers received before it."""
        if not jobs:
            return
        abort = threading.Event()
        first_error: OracleError | None = None
        pool = ThreadPoolExecutor(
            max_workers=min(self.concurrency, len(jobs)), thread_name_prefix="inpo-judge"
        )
        try:
            futures = {pool.submit(self._judge, *job, abort): j for j, job in enumerate(jobs)}
            for f in as_completed(futures):
                try:
                    answer = f.result()
                except (_Cancelled, CancelledError):
                    continue
                except OracleError as err:
                    first_error = first_error or err
                    abort.set()
                    for g in futures:
                        g.cancel()
                    continue
                yield futures[f], answer
        finally:
            abort.set()  # a consumer that stops early (or an error) stops the other requests
            pool.shutdown(wait=True, cancel_futures=True)
        if first_error is not None:
            raise first_error

    def iter_prob_prefers(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
    ) -> Iterator[tuple[int, float]]:
        """``(i, P(a_i ≻ b_i))`` for each pair as soon as both its orders are answered.

        A cache commits each answer as it arrives (:func:`inpo.oracles.cache.cached_prob_prefers`),
        so when a request fails for good, the answers already received are kept — none is paid
        for twice. The failure (an :class:`OracleError`) is raised after every pair answered
        before it was yielded; the other requests are cancelled.
        """
        n = check_lengths(prompts, responses_a, responses_b)
        if n == 0:
            return

        def label(i: int, order: str) -> str:
            return f"pair {i} (prompt {_truncate(str(prompts[i]), 40)}, order {order})"

        jobs = []  # both orders of pair 0, then of pair 1, …: pairs complete in turn
        for i in range(n):
            jobs.append((label(i, "a,b"), self._body(prompts[i], responses_a[i], responses_b[i])))
            jobs.append((label(i, "b,a"), self._body(prompts[i], responses_b[i], responses_a[i])))
        answers: dict[int, float] = {}  # job j → P_A; job 2i is pair i's a,b order, 2i+1 b,a
        for j, p in self._answers(jobs):
            answers[j] = p
            i = j // 2
            if 2 * i in answers and 2 * i + 1 in answers:
                self._count("queries")
                pair = combine_orders(np.array([answers[2 * i]]), np.array([answers[2 * i + 1]]))
                yield i, float(pair[0])
