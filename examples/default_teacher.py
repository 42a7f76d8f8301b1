"""A teacher file for ``algorithm=dno`` on the default task: one response per training prompt.

DNO ranks a stronger model's answer with the policy's samples. The default task has no other
model, so the "teacher" here is the panel's Borda winner of each prompt: the response with the
highest mean preference against every response of the task (exact, from the panel's matrix).

    python examples/default_teacher.py teacher.jsonl
"""

import json
import sys

from inpo.tasks import DefaultTask, DefaultTaskConfig


def main(out: str) -> None:
    task = DefaultTask(DefaultTaskConfig())
    prompts = list(dict.fromkeys(task.prompts_train))
    p = task.preference_matrix(prompts)  # [M, N, N]: P(y_i ≻ y_j | x_m)
    responses = task.responses()
    with open(out, "w") as fh:
        for prompt, matrix in zip(prompts, p):
            best = responses[int(matrix.mean(axis=1).argmax())]
            fh.write(json.dumps({"prompt": prompt, "completion": best}) + "\n")
    print(f"wrote {len(prompts)} teacher responses to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "teacher.jsonl")
