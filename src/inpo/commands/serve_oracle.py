"""``inpo serve-oracle``: serve a local preference oracle over an OpenAI-compatible HTTP API.

Examples::

    inpo serve-oracle --oracle reward-model --model ./my-rm --port 8000
    inpo serve-oracle --oracle pairwise --model ./pair-pm --device cuda
    inpo serve-oracle --oracle table --matrix P.npy --responses responses.txt

Workers then annotate with ``HTTPJudgeOracle("http://HOST:PORT", MODEL_NAME)``, where
``MODEL_NAME`` is printed at start-up (the oracle id unless ``--served-model-name`` is given).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from inpo.errors import ConfigError, DataError

__all__ = ["build_oracle", "main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inpo serve-oracle",
        description="Serve a local preference oracle as an OpenAI-compatible judge endpoint "
        "(POST /v1/chat/completions, GET /v1/models, GET /health).",
    )
    p.add_argument("--oracle", required=True, choices=["reward-model", "pairwise", "table"])
    p.add_argument("--model", help="model folder (reward-model, pairwise)")
    p.add_argument("--matrix", help="table: .npy preference matrix P[i, j] = P(y_i > y_j)")
    p.add_argument(
        "--responses", help="table: the responses, one per line (.txt) or a JSON list (.json)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--served-model-name", help="model name clients send (default: oracle id)")
    p.add_argument("--template", action="append", help="judge template(s) accepted (default: all)")
    p.add_argument("--api-key-env", help="require 'Authorization: Bearer $VAR' on requests")
    p.add_argument("--no-logprobs", action="store_true", help="answer with text verdicts only")
    p.add_argument("--batch-size", type=int, default=16, help="model forward batch size")
    p.add_argument("--max-batch", type=int, default=64, help="queries gathered per oracle call")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    t = p.add_argument_group("test-only fault injection (never in production)")
    t.add_argument("--fault-delay-s", type=float, default=0.0, help="delay every answer")
    t.add_argument("--fault-fail-first-n", type=int, default=0)
    t.add_argument("--fault-fail-status", type=int, default=500)
    t.add_argument("--fault-malformed-json-first-n", type=int, default=0)
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
    if args.oracle in ("reward-model", "pairwise"):
        if not args.model:
            raise ConfigError(f"--oracle {args.oracle} needs --model PATH")
        if args.oracle == "reward-model":
            from inpo.oracles.reward_model import RewardModelOracle

            return RewardModelOracle(
                args.model,
                batch_size=args.batch_size,
                max_length=args.max_length,
                device=args.device,
                dtype=args.dtype,
            )
        from inpo.oracles.pairwise import PairwisePreferenceOracle

        return PairwisePreferenceOracle(
            args.model,
            batch_size=args.batch_size,
            max_length=args.max_length,
            device=args.device,
            dtype=args.dtype,
        )
    if not args.matrix or not args.responses:
        raise ConfigError("--oracle table needs --matrix FILE.npy and --responses FILE")
    try:
        from inpo.oracles.synthetic import TableOracle
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


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from inpo.oracles.server import FaultInjection, OracleServer

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
        api_key_env=args.api_key_env,
        emit_logprobs=not args.no_logprobs,
        max_batch=args.max_batch,
        faults=faults,
    )
    print(
        f"inpo serve-oracle: serving {server.model_name!r} on {server.url} "
        f"(templates: {', '.join(t.template_id for t in server.templates)})",
        file=sys.stderr,
        flush=True,
    )

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key_env:
        print(
            f"inpo serve-oracle: warning: listening on {args.host} without --api-key-env; "
            "anyone who can reach this port can query the oracle",
            file=sys.stderr,
        )

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)  # `kill` stops as cleanly as Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("inpo serve-oracle: stopped", file=sys.stderr)
    finally:
        server.shutdown()
    return 0
