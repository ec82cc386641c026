"""Verifiers by name: ``get_verifier("math", timeout_s=5.0)``.

A new verifier is one entry in ``VERIFIERS``: a name and a factory (usually the
class) whose keyword arguments come from the config (``router.verifier_kwargs``).
The trainer calls a ``RewardRouter`` built from the ``reward`` config section
(``router.py``): it picks each row's verifier by ``data_source`` and runs the
user's own function (``custom.py``) where the config names one.
"""

from __future__ import annotations

from typing import Callable

from echorl_jax.rewards.base import RewardResult, Verifier
from echorl_jax.rewards.choice import ChoiceVerifier
from echorl_jax.rewards.custom import CustomReward, RewardRow
from echorl_jax.rewards.math import MathVerifier
from echorl_jax.rewards.router import RewardConfig, RewardRouter, build_router, call_verifier, rows_for_batch

def _arith(**kwargs) -> Verifier:
    from echorl_jax.tasks.arith import ArithVerifier  # lazy: tasks.arith imports rewards.base

    return ArithVerifier(**kwargs)


VERIFIERS: dict[str, Callable[..., Verifier]] = {
    "math": MathVerifier,
    "arith": _arith,
    "choice": ChoiceVerifier,
}


def get_verifier(name: str, **kwargs) -> Verifier:
    """Build the verifier registered as ``name`` with ``kwargs``."""
    try:
        factory = VERIFIERS[name]
    except KeyError:
        raise ValueError(f"unknown verifier {name!r}; known: {sorted(VERIFIERS)}") from None
    return factory(**kwargs)


__all__ = ["VERIFIERS", "CustomReward", "MathVerifier", "RewardConfig", "RewardResult", "RewardRouter", "RewardRow",
           "Verifier", "build_router", "call_verifier", "get_verifier", "rows_for_batch"]
