"""``task=panel`` on SmolLM2-135M-Instruct: five algorithms, three iterations, two seeds.

Runs ``inpo compare task=panel`` once a seed (the settings below, printed in the result) and
records, per algorithm, the mean over seeds of the final policy's

* pool-restricted duality gap (the game on every answer a final policy or π_ref gave, each
  policy renormalised over it from its exact log-probs; lower is better), with each seed's;
* cross-play win rate against every other final policy (mean of its row) and against π_ref,
  by the panel's probabilities;
* win rate against π_ref on held-out prompts (in-run evaluation, both orders), KL to π_ref and
  mean answer length;

the panel's cyclic share on π_ref's own held-out answers, the wall time and the load. Needs
``make real-model``. Writes ``benchmarks/results/panel_task.md``.

    python benchmarks/panel_task.py [--seeds 0,1] [--root DIR] [--from DIR]

``--from DIR`` reads finished compares (``DIR/seed<k>``) instead of running them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results" / "panel_task.md"
ALGORITHMS = "inpo,online_ipo,dpo,sppo,nash_md"
#: Sized for the issue's budget (two seeds in about 30 minutes on two idle cores) and chosen
#: before the results were seen; the panel is the task's own. 16 fresh prompts an iteration
#: and 4 pairs an optimizer step, so each iteration takes several steps: at one step an
#: iteration (the record of 2026-12-07 morning: 8 prompts, lr 3e-5) Adam's first step is about
#: lr·sign(gradient), the same for INPO, online IPO, DPO and Nash-MD, and nothing could
#: separate them. 16 held-out prompts for narrower intervals than 8 gave (±0.2).
SETTINGS = [
    "iterations=3",
    "max_prompts=16",
    "generate.max_new_tokens=32",
    "train.optim.epochs=1",
    "train.optim.global_batch_size=4",
    "train.optim.per_device_batch_size=4",
    "train.optim.learning_rate=1e-5",
    "evaluate.num_prompts=16",
    "evaluate.k=2",
]
IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def command(run_dir: Path, seed: int) -> list[str]:
    return ["inpo", "compare", f"run_dir={run_dir}", "task=panel", f"seed={seed}",
            f"algorithms={ALGORITHMS}", *SETTINGS]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--root", default="")
    ap.add_argument("--from", dest="from_", default="")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.from_ or args.root or tempfile.mkdtemp(prefix="inpo-panel-"))
    load = os.getloadavg()
    seconds = {}
    for seed in seeds:
        run_dir = root / f"seed{seed}"
        if not args.from_:
            t0 = time.time()
            subprocess.run(command(run_dir, seed), check=True,
                           env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
            seconds[seed] = time.time() - t0
    load_after = os.getloadavg()
    finals = {s: json.loads((root / f"seed{s}" / "final.json").read_text()) for s in seeds}
    lasts = {}
    for s in seeds:
        rows = [
            json.loads(x)
            for x in (root / f"seed{s}" / "metrics.jsonl").read_text().split("\n")
            if x
        ]
        for r in rows:
            lasts[(s, r["algorithm"], r["iteration"])] = r
    names = finals[seeds[0]]["policies"]
    iters = max(k[2] for k in lasts)
    lines = [
        "# task=panel on SmolLM2-135M-Instruct: five algorithms, 3 iterations, 2 seeds",
        "",
        f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.python_version()}; load average {load[0]:.2f} before and {load_after[0]:.2f} "
        "after the runs. Command, once a seed:",
        "",
        "    " + " ".join(command(Path("RUN"), 0)).replace("seed=0", "seed=S"),
        "",
        "Wall time per seed: "
        + ", ".join(f"seed {s}: {v / 60:.1f} min" for s, v in seconds.items())
        + ("" if seconds else "(read from finished runs)")
        + ".",
        "",
        "Final policies (mean over seeds; each seed's value in brackets). *pool gap*: the duality gap "
        "of the game restricted to every held-out answer a final policy or π_ref gave (lower is "
        "better); *cross-play*: mean P(its answer ≻ another final policy's); *win vs π_ref*, *KL*, "
        "*length*: the in-run evaluation of the last iteration.",
        "",
        "| policy | pool gap | cross-play | win vs π_ref | KL to π_ref | length |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        gaps = [finals[s]["pool"][name]["pool_duality_gap"] for s in seeds]
        cross = []
        for s in seeds:
            m = np.array(finals[s]["crossplay"])
            i = finals[s]["policies"].index(name)
            others = [j for j, n in enumerate(finals[s]["policies"]) if n not in (name, "π_ref")]
            cross.append(float(m[i, others].mean()))
        # π_ref: its own evaluation (iteration 0, against itself)
        key = (names[0], 0) if name == "π_ref" else (name, iters)
        rows_ = [lasts[(s, *key)] for s in seeds]
        win = [r["win_rate_vs_ref"] for r in rows_]
        kl = [r["kl_to_ref"] for r in rows_]
        length = [r["mean_length"] for r in rows_]

        def cell(v: list[float]) -> str:
            each = ", ".join(f"{x:.3f}" for x in v)
            return f"{np.mean(v):.3f} [{each}]" if len(v) > 1 else f"{v[0]:.3f}"

        lines.append(f"| {name} | {cell(gaps)} | {cell(cross)} | {cell(win)} | {cell(kl)} | "
                     f"{np.mean(length):.1f} |")  # fmt: skip
    lines += [
        "",
        "Per iteration (in-run evaluation of π_t against π_ref on the held-out prompts; mean over "
        "seeds, each seed's in brackets; the pool is π_t's and π_ref's answers of that evaluation, "
        "and π_ref's own gap on the same pool is beside π_t's):",
        "",
        "| algorithm | iteration | pool gap | π_ref's gap, same pool | win vs π_ref | KL to π_ref |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        if name == "π_ref":
            continue
        for t in range(1, iters + 1):
            rows_ = [lasts[(s, name, t)] for s in seeds]

            def each(key: str, rows_: list = rows_) -> str:
                v = [r[key] for r in rows_]
                return f"{np.mean(v):.3f} [" + ", ".join(f"{x:.3f}" for x in v) + "]"

            lines.append(f"| {name} | {t} | {each('pool_duality_gap')} | "
                         f"{each('ref_pool_duality_gap')} | {each('win_rate_vs_ref')} | "
                         f"{each('kl_to_ref')} |")  # fmt: skip
    cyc = [lasts[(s, names[0], 0)].get("cyclic_triples") for s in seeds]
    lines += [
        "",
        f"The panel's majority is cyclic on {np.mean(cyc):.1%} of sampled triples of π_ref's and "
        "its own held-out answers (iteration 0's evaluation pool).",
        "",
    ]
    for kind in ("crossplay", "metrics"):  # the first seed's plots, as `inpo compare` drew them
        shutil.copyfile(root / f"seed{seeds[0]}" / "plots" / f"{kind}.png",
                        IMG / f"panel_{kind}.png")  # fmt: skip
    lines += [f"Plots (seed {seeds[0]}): `docs/img/panel_crossplay.png`, "
              "`docs/img/panel_metrics.png`.", ""]  # fmt: skip
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
