"""``task=panel``: a real chat model in front of a general, cyclic preference over real text.

The default task's world is enumerable; this one is not. Its pieces:

* **prompts** — 240 everyday chat prompts written for inpo (``data/panel_prompts.jsonl``, one
  user turn each), 176 for training and 64 held out (the ``split`` column);
* **an annotator panel** of three equal groups, each a Bradley–Terry model on a readable score
  of the response text with temperature ``T_g``:

  - *concise*: ``s = −(words)/10`` — shorter is better;
  - *thorough*: ``s = 4·(share of the prompt's content words the answer covers)`` — it
    answers what was asked;
  - *friendly*: ``s = min(warm words, 3) + min(you/your, 8)/4 + min(list lines, 4)/2 +
    ½·1{ends with '?' or '!'}`` — warm, addressed to the reader, structured;

  ``P_g(a ≻ b) = σ((s_g(a) − s_g(b)) / T_g)`` with ``T_g = ¼``, and the panel's ``P(a ≻ b) = Σ_g w_g P_g(a ≻ b)``
  is closed-form, ``P(a ≻ b) + P(b ≻ a) = 1``. Three tastes that pull apart (length against
  coverage against tone) make the majority cyclic on some triples of answers:
  :func:`cyclic_share` measures how many, on the policy's own samples.

The panel reads only the text (never a model), so it is exact, free and fast: the in-run
evaluation can score probabilities in both orders and the pool-restricted game of
:func:`pool_game` is exact.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from inpo.data import completion_text, prompt_text
from inpo.oracles.base import OracleStats, check_lengths

__all__ = [
    "GROUPS",
    "PanelOracle",
    "cyclic_share",
    "panel_prompts",
    "pool_game",
]

_VERSION = "1"
_WORD = re.compile(r"[A-Za-z][A-Za-z']*")
_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
_STOP = frozenset(
    """a about after again all also am an and any are as at be because been before being but by
    can could did do does doing for from get got had has have having how i if in into is it its
    just me might more most my no not of on one or our out over please should so some such than
    that the their them then there these they this those to too up very was way we were what
    when where which who why will with would you your yours good best simple first short""".split()
)
_FRIENDLY = frozenset(
    """glad happy hope enjoy great wonderful love lovely thanks thank sure welcome luck
    congratulations fun nice kind""".split()
)


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _content(words: Sequence[str]) -> set[str]:
    """Content words as 5-letter stems (``covers`` covers ``covering``)."""
    return {w[:5] for w in words if len(w) >= 4 and w not in _STOP}


def concise(prompt: str, response: str) -> float:
    """Shorter is better: minus the number of words, in tens."""
    return -len(_words(response)) / 10.0


def thorough(prompt: str, response: str) -> float:
    """The share of the prompt's content words the answer covers, ×4."""
    asked = _content(_words(prompt))
    said = _content(_words(response))
    return 4.0 * len(asked & said) / len(asked) if asked else 0.0


def friendly(prompt: str, response: str) -> float:
    """Warm words (at most 3 count), a quarter for each 'you'/'your' (at most 8), a half for
    each list line (at most 4), and a half for an answer that ends on '?' or '!'."""
    words = _words(response)
    warm = min(sum(w in _FRIENDLY for w in words), 3)
    you = min(sum(w in ("you", "your") for w in words), 8)
    lines = min(len(_LIST_LINE.findall(response)), 4)
    end = 0.5 if response.rstrip().endswith(("?", "!")) else 0.0
    return warm + you / 4.0 + lines / 2.0 + end


@dataclass(frozen=True)
class Group:
    """One annotator group: a score of ``(prompt, response)``, its temperature and weight."""

    name: str
    score: Any
    temperature: float = 0.25
    weight: float = 1.0 / 3.0


#: The panel: three equal groups whose tastes pull apart.
GROUPS: tuple[Group, ...] = (
    Group("concise", concise),
    Group("thorough", thorough),
    Group("friendly", friendly),
)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class PanelOracle:
    """The panel as a preference oracle: ``P(a ≻ b | x) = Σ_g w_g σ((s_g(x, a) − s_g(x, b))/T_g)``.

    Prompts may be text or conversations (read with :func:`inpo.data.prompt_text`), answers
    text or assistant turns. Exact and free: ``stats`` still counts the queries asked.
    """

    def __init__(self, groups: Sequence[Group] = GROUPS) -> None:
        self.groups = tuple(groups)
        total = sum(g.weight for g in self.groups)
        self.weights = np.array([g.weight / total for g in self.groups])
        self.stats = OracleStats()
        spec = [
            (g.name, g.temperature, round(float(w), 12)) for g, w in zip(self.groups, self.weights)
        ]
        digest = hashlib.sha256(json.dumps(["panel-text", _VERSION, spec]).encode()).hexdigest()
        self.oracle_id = f"text-panel-v{_VERSION}:{digest[:16]}"

    def scores(self, prompt: Any, responses: Sequence[Any]) -> np.ndarray:
        """Each group's score of each response, ``[G, n]``."""
        x = prompt_text(prompt)
        ys = [completion_text(r) for r in responses]
        return np.array([[g.score(x, y) for y in ys] for g in self.groups], dtype=np.float64)

    def _probs(self, sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
        d = sa - sb  # [G, ...]
        temps = np.array([g.temperature for g in self.groups]).reshape((-1,) + (1,) * (d.ndim - 1))
        return np.tensordot(self.weights, _sigmoid(d / temps), axes=1)

    def prob_prefers(
        self, prompts: Sequence[Any], responses_a: Sequence[Any], responses_b: Sequence[Any]
    ) -> np.ndarray:
        """``P(a_i ≻ b_i | prompt_i)``, float64 ``[n]``."""
        n = check_lengths(prompts, responses_a, responses_b)
        out = np.empty(n, dtype=np.float64)
        for i, (x, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
            s = self.scores(x, [a, b])
            out[i] = float(self._probs(s[:, :1], s[:, 1:])[0])
        self.stats.queries += n
        self.stats.backend_calls += 1
        return out

    def preference_matrix(self, prompt: Any, responses: Sequence[Any]) -> np.ndarray:
        """The exact ``[n, n]`` matrix ``P(y_i ≻ y_j | prompt)`` (diagonal ½); not counted."""
        s = self.scores(prompt, responses)
        return self._probs(s[:, :, None], s[:, None, :])


def cyclic_share(
    oracle: PanelOracle,
    prompts: Sequence[Any],
    responses: Sequence[Sequence[Any]],
    *,
    triples: int = 2000,
    seed: int = 0,
) -> tuple[float, int]:
    """The share of sampled triples of distinct answers (one prompt's) whose panel majority is a
    cycle (``a ≻ b ≻ c ≻ a`` with every ``P > ½``), and how many triples were drawn."""
    rng = np.random.default_rng(seed)
    usable = []
    for x, ys in zip(prompts, responses):
        distinct = list(dict.fromkeys(completion_text(y) for y in ys))
        if len(distinct) >= 3:
            usable.append(oracle.preference_matrix(x, distinct))
    if not usable:
        return 0.0, 0
    cycles = 0
    for _ in range(triples):
        p = usable[rng.integers(len(usable))]
        i, j, k = rng.choice(p.shape[0], size=3, replace=False)
        forward = p[i, j] > 0.5 and p[j, k] > 0.5 and p[k, i] > 0.5
        backward = p[j, i] > 0.5 and p[k, j] > 0.5 and p[i, k] > 0.5
        cycles += forward or backward
    return float(cycles) / triples, triples


def pool_game(
    p: np.ndarray, logps: dict[str, np.ndarray], ref: str, tau: float
) -> dict[str, dict[str, float]]:
    """The **pool-restricted** game of one prompt: ``p [N, N]`` the panel on a pool of ``N``
    distinct answers (sampled from every policy compared and π_ref), ``logps[name] [N]`` each
    policy's exact log-probabilities of the pool's answers. Each policy is renormalised over the
    pool, and :mod:`inpo.game.exact` gives its duality gap (the ``τ``-regularised game with
    π_ref restricted likewise) and exploitability ``max_y P(y ≻ π) − ½`` in that game.

    What it bounds: how far each policy is from the Nash policy of the game *restricted to these
    answers*, a lower bound on nothing outside them (an answer no policy sampled can beat them
    all); it ranks policies on a common pool, as the default task's exact gap does on all 399
    answers."""
    from inpo.game.exact import duality_gap, exploitability  # deferred: loads scipy

    def renorm(lp: np.ndarray) -> np.ndarray:
        z = lp - lp.max()
        w = np.exp(z)
        return w / w.sum()

    pr = renorm(logps[ref])
    out = {}
    for name, lp in logps.items():
        pi = renorm(lp)
        out[name] = {
            "pool_duality_gap": float(duality_gap(p[None], pi[None], pr[None], tau)[0]),
            "pool_exploitability": float(exploitability(p[None], pi[None])[0]),
        }
    return out


def panel_prompts(split: str) -> list[list[dict[str, str]]]:
    """The task's prompts of ``split`` (``train``: 176, ``test``: 64), as conversations."""
    text = resources.files("inpo.tasks").joinpath("data/panel_prompts.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r["prompt"] for r in rows if r["split"] == split]
