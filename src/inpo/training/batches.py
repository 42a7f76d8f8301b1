"""Which pairs each optimizer step takes: epochs of a seeded permutation, ``global_batch_size``
pairs a step, each process its share (``rows[rank::world]``), each share in micro-batches.

The order depends on the seed, the epoch and the step only, never on the number of processes, so
a training resumes on any number of them and takes the same pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["StepPlan", "epoch_order", "micro_batches"]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order of ``n`` rows in ``epoch``: a permutation seeded by ``(seed, epoch)``, or the
    file's order without ``shuffle``."""
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


@dataclass
class StepPlan:
    """The step arithmetic of a training over ``n_rows`` pairs."""

    n_rows: int
    global_batch: int
    seed: int
    shuffle: bool
    epochs: int = 1
    max_steps: int | None = None
    _order: tuple[int, list[int]] = field(default=(-1, []), repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.global_batch)

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.epochs * self.steps_per_epoch

    def rows(self, step: int) -> list[int]:
        """The row indices optimizer step ``step`` (0-based) takes, over all processes."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.n_rows, self.seed, epoch, self.shuffle))
        g = self.global_batch
        return self._order[1][in_epoch * g : (in_epoch + 1) * g]

    def epoch(self, step: int) -> float:
        """The epoch reached after step ``step`` (0-based), fractional."""
        spe = self.steps_per_epoch
        return step // spe + (step % spe + 1) / spe


def micro_batches(
    step_rows: list[int],
    rank: int,
    world: int,
    micro: int,
    key: Callable[[int], Any] | None = None,
) -> list[list[int]]:
    """This process's share of a step's rows in micro-batches of ``micro`` (sorted by ``key``
    first, if given). Every process gets as many micro-batches as the one with the most rows
    (their collectives must pair up); a process out of rows gets empty ones, which run one row
    weighted by zero."""
    local = step_rows[rank::world]
    if key is not None:
        local = sorted(local, key=key)
    n_micro = math.ceil(math.ceil(len(step_rows) / world) / micro)
    return [local[m * micro : (m + 1) * micro] for m in range(n_micro)]
