"""The default task's world: a prompt grammar, an enumerable response space and a cyclic panel.

Prompts come from :data:`TEMPLATES` × colours × shapes (6 × 3 × 3 = 54 by default), e.g.
``"describe a red circle"`` or ``"draw a star in blue"``. Each template names one of its slots as
the prompt's *keyword* (``keyword_of("describe a red circle") == "red"``,
``keyword_of("draw a star in blue") == "star"``).

A response is 1 to ``max_len`` words over the response vocabulary ``colours + shapes + fillers``
(``fillers = ["very"]`` by default, a word that is never a keyword) joined by single spaces
(``"red"``, ``"very star star"``): ``7 + 49 + 343 = 399`` responses for 7 words and
``max_len = 3``, enumerated by :func:`enumerate_responses` in a fixed order (by length, then
``itertools.product`` order of the vocabulary). The empty response is *not* in the set.

The oracle is an :class:`~inpo.oracles.synthetic.AnnotatorPanel` of three groups:

* ``brevity()`` — fewer characters is better;
* ``prompt-keyword`` — more occurrences (whole words) of the prompt's keyword is better;
* ``lexicographic(reverse=True)`` — alphabetically *later* is better (an "order" taste).

Brevity pulls towards short responses while the keyword and reverse-order groups pull towards
long ones in different directions, so no response wins a majority against all others (no
Condorcet winner) and the majority is cyclic on many triples; the unregularised Nash mixes
several responses (e.g. ``red red``, ``very red``, ``red red red``, ``very red red`` for keyword
``red``). The filler matters: it is the alphabetically last word and never a keyword. Were the
last word a keyword (``star`` without ``very``), ``star star star`` would win both the keyword
and the order vote against everything: a Condorcet winner and a pure Nash.

Every taste is a score, so :func:`panel_matrices` computes the exact matrix
``P[i, j] = P(y_i ≻ y_j | x)`` vectorised, bit-for-bit equal to
``AnnotatorPanel.preference_matrix`` (which loops in Python). Only NumPy is imported.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from inpo.errors import ConfigError, OracleError
from inpo.oracles.synthetic import (
    AnnotatorGroup,
    AnnotatorPanel,
    Taste,
    brevity,
    lexicographic,
    score_taste,
)

__all__ = [
    "GRAMMAR_VERSION",
    "TEMPLATES",
    "Grammar",
    "enumerate_responses",
    "panel_matrices",
]

GRAMMAR_VERSION = "1"

#: ``(template, keyword slot)``: the slot whose word the ``prompt-keyword`` group looks for.
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("describe a {color} {shape}", "color"),
    ("draw a {shape} in {color}", "shape"),
    ("paint the {shape} {color}", "color"),
    ("name a {color} {shape}", "shape"),
    ("show me a {color} {shape}", "color"),
    ("sketch one {shape} colored {color}", "shape"),
)


def enumerate_responses(vocab: Sequence[str], max_len: int) -> list[str]:
    """All responses of 1 to ``max_len`` words over ``vocab``, by length then product order.

    ``len = Σ_{l=1}^{max_len} |vocab|^l`` (399 for 7 words and ``max_len = 3``).
    """
    return [
        " ".join(words)
        for length in range(1, max_len + 1)
        for words in itertools.product(vocab, repeat=length)
    ]


class Grammar:
    """The prompts of the default task and the keyword of each.

    Args:
        colors, shapes: the slot fillers (each a possible keyword).
        fillers: response words that are never a keyword.

    ``colors + shapes + fillers`` is the response vocabulary: single lower-case words, all
    distinct, none of them a template word.
    """

    def __init__(
        self, colors: Sequence[str], shapes: Sequence[str], fillers: Sequence[str] = ()
    ) -> None:
        self.colors, self.shapes, self.fillers = list(colors), list(shapes), list(fillers)
        template_words = {w for t, _ in TEMPLATES for w in t.split() if not w.startswith("{")}
        vocab = [*self.colors, *self.shapes, *self.fillers]
        for w in vocab:
            if not (isinstance(w, str) and w.isalpha() and w.islower()):
                raise ConfigError(f"task word {w!r} must be a single lower-case alphabetic word")
            if w in template_words:
                raise ConfigError(f"task word {w!r} is also a template word; pick another")
        if len(set(vocab)) != len(vocab):
            raise ConfigError(f"task words must be distinct, got {vocab}")
        if not self.colors or not self.shapes:
            raise ConfigError("the task needs at least one color and one shape")
        self.vocab = vocab
        self.template_words = sorted(template_words)
        self._keyword: dict[str, str] = {}
        for template, slot in TEMPLATES:
            for color in self.colors:
                for shape in self.shapes:
                    prompt = template.format(color=color, shape=shape)
                    self._keyword[prompt] = color if slot == "color" else shape
        self.prompts = list(self._keyword)

    def keyword_of(self, prompt: str) -> str:
        """The prompt's keyword; :class:`~inpo.errors.OracleError` for an unknown prompt."""
        try:
            return self._keyword[prompt]
        except KeyError:
            raise OracleError(
                f"prompt {prompt!r} is not one of the default task's {len(self._keyword)} prompts"
            ) from None

    def words(self) -> list[str]:
        """Every word a prompt or a response can contain (tokenizer vocabulary, sorted)."""
        return sorted({*self.vocab, *self.template_words})

    # -----------------------------------------------------------------------------------------
    # The panel
    # -----------------------------------------------------------------------------------------

    def keyword_taste(self) -> Taste:
        """More whole-word occurrences of the prompt's keyword is better."""
        return score_taste(
            f"prompt-keyword(grammar-v{GRAMMAR_VERSION})",
            lambda prompt, r: r.split().count(self.keyword_of(prompt)),
        )

    def panel(self, weights: Sequence[float], epsilon: float, *, seed: int = 0) -> AnnotatorPanel:
        """The annotator panel: ``brevity``, ``prompt-keyword``, ``lexicographic(reverse=True)``
        with ``weights`` (in that order) and label noise ``epsilon``."""
        if len(weights) != 3:
            raise ConfigError(
                f"panel weights must be 3 numbers (brevity, keyword, order), got {weights}"
            )
        tastes = (brevity(), self.keyword_taste(), lexicographic(reverse=True))
        groups = [AnnotatorGroup(t, float(w)) for t, w in zip(tastes, weights, strict=True)]
        return AnnotatorPanel(groups, epsilon=epsilon, seed=seed)

    def scores(self, prompt: str, responses: Sequence[str]) -> np.ndarray:
        """``[3, N]`` scores of the panel's tastes (higher is better) for distinct ``responses``.

        The order score is the rank in Python's string order, so comparing scores reproduces
        ``lexicographic(reverse=True)`` on this set exactly.
        """
        kw = self.keyword_of(prompt)
        order = sorted(range(len(responses)), key=lambda i: responses[i])
        rank = np.empty(len(responses))
        rank[order] = np.arange(len(responses))
        return np.stack(
            [
                -np.array([len(r) for r in responses], dtype=np.float64),
                np.array([r.split().count(kw) for r in responses], dtype=np.float64),
                rank,
            ]
        )


def panel_matrices(
    grammar: Grammar, panel: AnnotatorPanel, prompts: Sequence[str], responses: Sequence[str]
) -> np.ndarray:
    """Exact ``[M, N, N]`` matrices ``P(y_i ≻ y_j | x_m)`` of ``panel`` (built by
    :meth:`Grammar.panel`), vectorised.

    Same arithmetic as :meth:`AnnotatorPanel.preference_matrix` (weights summed in group order,
    the lower triangle set to ``1 − P[i, j]``, diagonal ``½``), so the two agree bit for bit.
    Matrices depend on the prompt only through its keyword; each keyword is computed once.
    """
    if len(set(responses)) != len(responses):
        raise ConfigError("panel_matrices needs distinct responses")
    eps = panel.epsilon
    n = len(responses)
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    by_keyword: dict[str, np.ndarray] = {}
    out = np.empty((len(prompts), n, n))
    for m, prompt in enumerate(prompts):
        kw = grammar.keyword_of(prompt)
        if kw not in by_keyword:
            p = np.zeros((n, n))
            for w, s in zip(panel.weights, grammar.scores(prompt, responses), strict=True):
                c = np.sign(s[:, None] - s[None, :])
                p = p + w * np.where(c > 0, 1.0 - eps, np.where(c < 0, eps, 0.5))
            p = np.clip(p, 0.0, 1.0)
            p = np.where(upper, p, (1.0 - p).T)
            np.fill_diagonal(p, 0.5)
            by_keyword[kw] = p
        out[m] = by_keyword[kw]
    return out
