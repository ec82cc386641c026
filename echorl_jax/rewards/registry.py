"""Verifiers by name: ``get_verifier("math", timeout_s=5.0)``.

A new verifier is one entry in ``VERIFIERS``: a name and a factory (usually the
class) whose keyword arguments come from the config (``router.verifier_kwargs``).
"""

from __future__ import annotations

from typing import Callable

from echorl_jax.rewards.base import Verifier
from echorl_jax.rewards.choice import ChoiceVerifier
from echorl_jax.rewards.math import MathVerifier


def _arith(**kwargs) -> Verifier:
    # lazy: tasks.arith imports rewards.base, which first runs this package's __init__ (this module)
    from echorl_jax.tasks.arith import ArithVerifier

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
