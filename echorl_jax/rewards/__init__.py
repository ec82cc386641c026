"""Verifiers by name: ``get_verifier("math", timeout_s=5.0)``.

A new verifier is one entry in ``VERIFIERS``: a name and a factory (usually the
class) whose keyword arguments come from the config.
"""

from __future__ import annotations

from typing import Callable

from echorl_jax.rewards.base import RewardResult, Verifier
from echorl_jax.rewards.math import MathVerifier

def _arith(**kwargs) -> Verifier:
    from echorl_jax.tasks.arith import ArithVerifier  # lazy: tasks.arith imports rewards.base

    return ArithVerifier(**kwargs)


VERIFIERS: dict[str, Callable[..., Verifier]] = {
    "math": MathVerifier,
    "arith": _arith,
}


def get_verifier(name: str, **kwargs) -> Verifier:
    """Build the verifier registered as ``name`` with ``kwargs``."""
    try:
        factory = VERIFIERS[name]
    except KeyError:
        raise ValueError(f"unknown verifier {name!r}; known: {sorted(VERIFIERS)}") from None
    return factory(**kwargs)


__all__ = ["VERIFIERS", "MathVerifier", "RewardResult", "Verifier", "get_verifier"]
