"""Every LM algorithm of ``inpo run`` next to its exact tabular update, on the default task.

For each algorithm, ``inpo run algorithm=A`` (the default task's defaults: 3 iterations, K = 8,
42 prompts × 16 draws, ``eta = 0.35``, ``tau = 0.05``, ``beta = 0.05``) for two seeds, and the
exact update of the same (sampler, prior) pair from the same ``π_ref`` table at the same
hyper-parameters (:func:`inpo.tasks.default.DefaultTask.tabular_inpo`):

=============  ==========================================================================
LM algorithm   exact twin (``inpo.game.algorithms``)
=============  ==========================================================================
inpo           ``inpo``
online_ipo     ``online_ipo`` (IPO against π_ref, ``β = τ``: the LM run uses ``tau = eta``)
inpo_no_kl     ``sppo`` (multiplicative weights: INPO with ``τ = 0``)
sppo           ``sppo``
dpo            ``dpo`` (``β = τ``; the default task's ``beta`` equals its ``tau``)
nash_md        ``nash_md`` (the sequence-level mixture; the LM samples it token by token)
comal          ``inpo`` with the reference moved to the iterate every ``ref_update_every``
mpo            ``mmd`` with the magnet moved likewise (MMD is INPO's update at ``η + τ``)
egpo           ``extragradient`` (mirror-prox on the ``mmd`` step: two LM trainings)
mirror_prox    ``extragradient`` (the same algorithm as egpo under another paper's name)
dno            ``sppo``: DNO's idealised update ``π_t exp(P(·≻π_t)/η)`` (its Algorithm 1);
               the LM runs DNO-Prct (DPO against π_t on large-margin best/worst pairs)
todo           ``dpo`` (TODO without ties is DPO with the offset ``α``; ties are dropped)
=============  ==========================================================================

The exact metrics are the duality gap of the ``τ``-regularised game with the *original* π_ref on
the 12 held-out prompts, for both. ``online_ipo``'s twin is run at ``tau = eta`` as the LM run
is. The ratio LM / exact after the last iteration is the figure of merit (1 = the LM pipeline
does what perfect optimisation would).

    python benchmarks/lm_vs_exact.py [--seeds 0,1] [--out benchmarks/results/lm_vs_exact.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: LM algorithm → (extra overrides, exact twin, ref_update_every of the twin, tau of the twin)
CASES = {
    "inpo": ([], "inpo", None, None),
    "online_ipo": ([], "online_ipo", None, "eta"),
    "inpo_no_kl": ([], "sppo", None, None),
    "sppo": ([], "sppo", None, None),
    "dpo": ([], "dpo", None, None),
    "nash_md": ([], "nash_md", None, None),
    "comal": (["ref_update_every=2"], "inpo", 2, None),
    "mpo": (["ref_update_every=2"], "mmd", 2, None),
    "egpo": ([], "extragradient", None, None),
    "mirror_prox": ([], "extragradient", None, None),
    "dno": ([], "sppo", None, None),
    "todo": ([], "dpo", None, None),
}


def exact_gaps(twin: str, every: int | None, tau_kind: str | None) -> list[float]:
    """The twin's exact iterates from π_ref's table (the step at ``tau``, or at ``eta`` for
    online IPO, whose LM run sets ``tau = eta``), with the anchor moved every ``every``
    updates; the gaps are those of the task's game (``tau = 0.05``, the original π_ref)."""
    import numpy as np

    from inpo.game.algorithms import ALGORITHMS
    from inpo.game.exact import duality_gap
    from inpo.pipeline.workloads import RUN_DEFAULTS
    from inpo.tasks import DefaultTask, DefaultTaskConfig

    eta, tau = RUN_DEFAULTS["eta"], RUN_DEFAULTS["tau"]
    task = DefaultTask(DefaultTaskConfig(eta=eta, tau=tau))
    task.build_reference()
    table = task.reference_table()
    p, ref = task.preference_matrix(table.prompts), table.policy
    step = ALGORITHMS[twin][0]
    step_tau = eta if tau_kind == "eta" else tau
    pi, anchor = ref, ref
    gaps = [float(duality_gap(p, pi, ref, tau).mean())]
    for t in range(3):
        pi = step(p, pi, anchor, eta=eta, tau=step_tau)
        if not np.isfinite(pi).all():
            raise SystemExit(f"{twin}: the exact step is not finite")
        if every and (t + 1) % every == 0:
            anchor = pi
        gaps.append(float(duality_gap(p, pi, ref, tau).mean()))
    return gaps


def lm_gaps(algorithm: str, extra: list[str], seed: int, root: Path) -> tuple[list[float], float]:
    run_dir = root / f"{algorithm}-seed{seed}"
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "inpo",
            "-q",
            "run",
            f"run_dir={run_dir}",
            f"algorithm={algorithm}",
            f"seed={seed}",
            *extra,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{algorithm} seed {seed} failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["duality_gap"] for r in rows], time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_vs_exact.md"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    load = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="inpo-lm-vs-exact-"))
    lines = [
        "# Every LM algorithm next to its exact tabular update (the default task)",
        "",
        f"Command: `python benchmarks/lm_vs_exact.py --seeds {args.seeds}` on {os.cpu_count()} "
        f"CPU cores, load average {load:.2f} at the start. Each LM run is `inpo run algorithm=A "
        "seed=S` with the default task's defaults (3 iterations, K = 8, eta = 0.35, tau = 0.05, "
        "beta = 0.05); comal and mpo add `ref_update_every=2`; dno keeps its default margin "
        "0.25 and has no teacher file. Metrics: the exact duality gap "
        "of the tau-regularised game with the original π_ref, on the 12 held-out prompts.",
        "",
        "| algorithm | exact twin | exact gap, iterations 0–3 | LM gap after 3 (per seed) | "
        "LM / exact (per seed) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for algorithm, (extra, twin, every, tau_kind) in CASES.items():
        exact = exact_gaps(twin, every, tau_kind)
        finals, ratios, secs = [], [], 0.0
        for seed in seeds:
            gaps, took = lm_gaps(algorithm, extra, seed, root)
            finals.append(gaps[-1])
            ratios.append(gaps[-1] / exact[-1])
            secs += took
        twin_name = twin + (f", moved every {every}" if every else "")
        lines.append(
            f"| {algorithm} | {twin_name} | {' → '.join(f'{g:.4f}' for g in exact)} | "
            f"{' / '.join(f'{g:.4f}' for g in finals)} | "
            f"{' / '.join(f'{r:.2f}' for r in ratios)} | {secs:.0f} |"
        )
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
