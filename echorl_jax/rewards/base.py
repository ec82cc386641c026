"""The verifier interface: host-side Python that turns responses into rewards.

A verifier is any callable ``(responses, ground_truths) -> RewardResult``. One
that also needs each row's record (the router, a custom hook) sets
``takes_rows = True`` and is called with a third argument, the ``RewardRow``s
(``rewards.call_verifier`` does the dispatch).
Rewards run on the host, outside jit; the trainer reshapes them to ``[N, G]``.
Model outputs are untrusted input: verifiers parse them, never ``eval`` them.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np


@dataclasses.dataclass
class RewardResult:
    """Rewards for a flat batch of ``n`` responses.

    reward_n:  float32 ``[n]`` — the verified reward of each response.
    correct_n: bool ``[n]`` — whether the answer was judged correct (accuracy
               metrics use this; it differs from ``reward_n > 0`` when a format
               reward or shaping is added).
    info:      per-batch counters (e.g. ``{"timeouts": 1, "no_answer": 3}``).
    """

    reward_n: np.ndarray
    correct_n: np.ndarray
    info: dict[str, float] = dataclasses.field(default_factory=dict)


class Verifier(Protocol):
    def __call__(self, responses: Sequence[str], ground_truths: Sequence[str]) -> RewardResult: ...
