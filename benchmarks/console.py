"""What a default ``inpo run`` prints: lines, what they say, and how soon the first one comes.

Runs ``inpo run`` (the embedded default task, 3 iterations) into a fresh folder twice — once
with a fresh reference cache (the first run on a machine: π_ref is built) and once with it
cached — reading stderr/stdout line by line as a log file or CI console would (not a
terminal), and classifies every line. Then, if ``tmux`` is installed, runs it in a terminal
and captures the screen at the end of iteration 1 (the docs' picture of the console).

    python benchmarks/console.py [--out benchmarks/results/console.md]

Claims checked (verdicts printed): no library progress bar or chatter ("Loading weights",
"Saving the dataset", "Writing model shards", "it/s", carriage returns); the first line within
5 s of the start; each iteration's duality gap printed as it finishes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOISE = ("Loading weights", "Saving the dataset", "Writing model shards", "it/s", "\r")


def kind(line: str) -> str:
    if line.startswith("inpo run:"):
        return "header"
    if line.startswith("[reference] "):
        return "reference"
    if line.startswith("["):
        return "stage"
    if line.startswith(("iteration ", "  ", "done:")) or not line.strip():
        return "table/summary"
    if line.startswith(("run folder:", "metrics:", "report:")):
        return "paths"
    return "other"


def run_logged(work: Path, cache: Path) -> dict:
    env = {**os.environ, "INPO_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("TQDM_DISABLE", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "inpo", "run", f"run_dir={work / 'run'}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=work,
        env=env,
    )
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None
    buf = b""
    while True:
        chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read()
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            lines.append((time.perf_counter() - t0, raw.decode("utf-8", "replace")))
    proc.wait()
    total = time.perf_counter() - t0
    # the per-iteration tables' rows (not the closing summary's "before → after" row)
    gaps = [t for t, line in lines if line.strip().startswith("duality gap ") and "→" not in line]
    metric = next((t for t, line in lines if "duality gap" in line), None)
    counts: dict[str, int] = {}
    for _, line in lines:
        counts[kind(line)] = counts.get(kind(line), 0) + 1
    return {
        "rc": proc.returncode,
        "lines": len(lines),
        "counts": counts,
        "noise": [line for _, line in lines if any(n in line for n in NOISE)],
        "first_line_s": lines[0][0] if lines else None,
        "first_line": lines[0][1] if lines else "",
        "gap_lines_s": gaps,
        "first_metric_s": metric,
        "total_s": total,
        "text": "\n".join(line for _, line in lines),
    }


def tmux_capture(work: Path) -> str | None:
    if shutil.which("tmux") is None:
        return None
    session = f"inpo-console-{os.getpid()}"
    cmd = f"cd {work} && {sys.executable} -m inpo run run_dir=tty; sleep 30"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "50", cmd])
    shot = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.1)
            screen = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
            # iteration 1's table is up and iteration 2's generation bar has moved
            moving = re.search(r"━ +[1-9][0-9]*/[0-9]+", screen)
            if "[iter_001/generate] running" in screen and moving:
                shot = screen
                break
            if "done:" in screen:
                break
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    return "\n".join(line.rstrip() for line in shot.strip().splitlines()) if shot else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/console.md")
    args = ap.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        (tmp / "c").mkdir()
        fresh = run_logged(tmp / "a", tmp / "cache")
        cached = run_logged(tmp / "b", tmp / "cache")
        env_cache = tmp / "cache"
        os.environ["INPO_CACHE_DIR"] = str(env_cache)
        screen = tmux_capture(tmp / "c")
    ok_noise = not fresh["noise"] and not cached["noise"]
    ok_first = fresh["first_line_s"] is not None and fresh["first_line_s"] < 5.0
    ok_gaps = len(cached["gap_lines_s"]) == 3
    verdicts = [
        ("no library bar or chatter in the output", ok_noise),
        ("first line within 5 s (fresh cache)", ok_first),
        ("each iteration's duality gap printed as it finishes (3 of 3)", ok_gaps),
    ]
    for text, ok in verdicts:
        print(f"{'MET' if ok else 'NOT MET'}: {text}")

    def summary(r: dict, what: str) -> list[str]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))
        gaps = ", ".join(f"{t:.1f}" for t in r["gap_lines_s"])
        return [
            f"- **{what}**: {r['lines']} lines ({counts}); first line after "
            f"{r['first_line_s']:.2f} s (`{r['first_line']}`); first metric (π_0's duality gap) "
            f"after {r['first_metric_s']:.1f} s; the iteration tables' duality-gap rows at {gaps} s; "
            f"whole run {r['total_s']:.1f} s; library bars/chatter: {len(r['noise'])}",
        ]

    lines = [
        "# The console of a default `inpo run`",
        "",
        f"`python benchmarks/console.py` on {os.cpu_count()} CPU cores, load average before the "
        f"run {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}. Output read as a log file or CI "
        "console reads it (not a terminal: no bars, no carriage returns).",
        "",
        "Before this change (issue 13's report): 63 lines, 25 of them transformers/datasets "
        "progress bars, no metric before `report.md` at the end.",
        "",
        *summary(fresh, "first run on a machine (π_ref built)"),
        *summary(cached, "π_ref cached"),
        "",
        *[f"- {'MET' if ok else 'NOT MET'}: {text}" for text, ok in verdicts],
        "",
        "## The whole output (π_ref cached)",
        "",
        "```text",
        cached["text"],
        "```",
        "",
    ]
    if screen:
        lines += [
            "## A terminal at the end of iteration 1 (tmux capture, 100 × 50)",
            "",
            "```text",
            screen,
            "```",
            "",
        ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
