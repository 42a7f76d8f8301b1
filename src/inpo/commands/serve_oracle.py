"""``inpo serve-oracle``: serve a local preference oracle over an OpenAI-compatible HTTP API.

Examples::

    inpo serve-oracle --oracle reward_model --model ./my-rm --port 8000
    inpo serve-oracle --oracle pairwise --model ./pair-pm --device cuda
    inpo serve-oracle --oracle table --matrix P.npy --responses responses.txt

Workers then annotate with ``HTTPJudgeOracle("http://HOST:PORT", MODEL_NAME)``, where
``MODEL_NAME`` is printed at start-up (the oracle id unless ``--served-model-name`` is given).

Authentication: the key is the value of the environment variable named by ``--api-key-env``
(default ``INPO_ORACLE_API_KEY``); when it is set, every request but ``/health`` needs
``Authorization: Bearer <key>``. A server on a non-loopback host refuses to start without a
key. On loopback with no key set it serves without one and says so; ``--no-auth`` (loopback
only) serves without a key even when the variable is set.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from inpo.commands._args import (
    ArgumentParser,
    non_negative_float,
    non_negative_int,
    port_number,
    positive_int,
)
from inpo.errors import ConfigError, DataError

__all__ = ["DEFAULT_KEY_ENV", "build_oracle", "main"]

DEFAULT_KEY_ENV = "INPO_ORACLE_API_KEY"


# the model oracles by the names `annotate.oracle` and `inpo eval --oracle` use, and the
# hyphenated name this command first took
ORACLES = ("reward_model", "reward-model", "pairwise", "gpm", "table")


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="inpo serve-oracle",
        description="Serve a local preference oracle as an OpenAI-compatible judge endpoint "
        "(POST /v1/chat/completions, GET /v1/models, GET /health).",
    )
    p.add_argument("--oracle", required=True, choices=ORACLES)
    p.add_argument("--model", help="model folder (reward_model, pairwise, gpm)")
    p.add_argument(
        "--pairwise-format",
        choices=("rlhflow", "chat"),
        default="rlhflow",
        help="pairwise: RLHFlow's rendering (its pairwise models) or a general judging question "
        "through the model's chat template (any chat model as judge)",
    )
    p.add_argument("--matrix", help="table: .npy preference matrix P[i, j] = P(y_i > y_j)")
    p.add_argument(
        "--responses", help="table: the responses, one per line (.txt) or a JSON list (.json)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000, help="0 picks a free port")
    p.add_argument("--served-model-name", help="model name clients send (default: oracle id)")
    p.add_argument("--template", action="append", help="judge template(s) accepted (default: all)")
    p.add_argument(
        "--api-key-env",
        default=DEFAULT_KEY_ENV,
        help="environment variable holding the API key clients must send as "
        f"'Authorization: Bearer KEY' (default {DEFAULT_KEY_ENV}; required off loopback)",
    )
    p.add_argument(
        "--no-auth", action="store_true", help="serve without a key (only on a loopback host)"
    )
    p.add_argument("--no-logprobs", action="store_true", help="answer with text verdicts only")
    p.add_argument("--batch-size", type=positive_int, default=16, help="model forward batch size")
    p.add_argument(
        "--max-batch", type=positive_int, default=64, help="queries gathered per oracle call"
    )
    p.add_argument("--max-length", type=positive_int, default=2048)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    t = p.add_argument_group("test-only fault injection (never in production)")
    t.add_argument(
        "--fault-delay-s", type=non_negative_float, default=0.0, help="delay every answer"
    )
    t.add_argument("--fault-fail-first-n", type=non_negative_int, default=0)
    t.add_argument("--fault-fail-status", type=int, default=500)
    t.add_argument("--fault-malformed-json-first-n", type=non_negative_int, default=0)
    return p


def _read_responses(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"responses file '{path}' does not exist")
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text())
        except ValueError as err:
            raise DataError(f"responses file '{path}' is not valid JSON: {err}") from err
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise DataError(f"responses file '{path}' must hold a JSON list of strings")
        return items
    return path.read_text().removesuffix("\n").split("\n")


def build_oracle(args: argparse.Namespace):
    """The oracle named by the parsed command line."""
    if args.oracle != "table":
        if not args.model:
            raise ConfigError(f"--oracle {args.oracle} needs --model PATH")
        from inpo.training.oracle_loop import load_oracle  # deferred: loads numpy, torch, yaml

        kind = {"reward_model": "bt", "reward-model": "bt"}.get(args.oracle, args.oracle)
        return load_oracle(
            kind,
            args.model,
            batch_size=args.batch_size,
            max_length=args.max_length,
            device=args.device,
            dtype=args.dtype,
            **({"format": args.pairwise_format} if kind == "pairwise" else {}),
        )
    if not args.matrix or not args.responses:
        raise ConfigError("--oracle table needs --matrix FILE.npy and --responses FILE")
    try:
        from inpo.oracles.synthetic import TableOracle  # deferred: loads numpy
    except ImportError as err:  # pragma: no cover - synthetic.py ships with inpo
        raise ConfigError(f"the table oracle is not available in this install: {err}") from err
    import numpy as np

    matrix_path = Path(args.matrix)
    if not matrix_path.is_file():
        raise DataError(f"matrix file '{matrix_path}' does not exist")
    try:
        matrix = np.load(matrix_path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"matrix file '{matrix_path}' is not a .npy array: {err}") from err
    return TableOracle(matrix, _read_responses(Path(args.responses)))


def _key_env(args: argparse.Namespace) -> str | None:
    """The variable whose value every request must carry, or ``None`` (no auth); refuses the
    combinations that would expose the oracle without a key."""
    import os

    from inpo.oracles.server import LOOPBACK  # deferred: loads numpy

    loopback = args.host in LOOPBACK
    if args.no_auth:
        if not loopback:
            raise ConfigError(
                f"--no-auth is only allowed on a loopback host, not {args.host}: a server "
                "reachable from the network needs a key (--api-key-env)"
            )
        return None
    if os.environ.get(args.api_key_env):
        return args.api_key_env
    if not loopback:
        raise ConfigError(
            f"listening on {args.host} needs an API key: set the environment variable "
            f"{args.api_key_env} (or name another with --api-key-env)"
        )
    return None


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from inpo.oracles.server import FaultInjection, OracleServer  # deferred: loads numpy

    key_env = _key_env(args)  # before the oracle loads: a refusal costs nothing
    oracle = build_oracle(args)
    faults = FaultInjection(
        delay_s=args.fault_delay_s,
        fail_first_n=args.fault_fail_first_n,
        fail_status=args.fault_fail_status,
        malformed_json_first_n=args.fault_malformed_json_first_n,
    )
    server = OracleServer(
        oracle,
        host=args.host,
        port=args.port,
        templates=args.template,
        model_name=args.served_model_name,
        api_key_env=key_env,
        emit_logprobs=not args.no_logprobs,
        max_batch=args.max_batch,
        faults=faults,
    )
    if key_env:
        auth = f"API key from ${key_env}"
    elif args.no_auth:
        auth = "no API key: --no-auth"
    else:
        auth = f"no API key: ${args.api_key_env} is not set; loopback only"
    print(
        f"inpo serve-oracle: serving {server.model_name!r} on {server.url} ({auth}; "
        f"templates: {', '.join(t.template_id for t in server.templates)})",
        file=sys.stderr,
        flush=True,
    )

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again for the
    # handler it found: ours turns it into a clean exit (0)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    print("inpo serve-oracle: stopped", file=sys.stderr)
    return 0
