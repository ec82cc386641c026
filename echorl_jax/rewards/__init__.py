"""Verifiers: math-verify (``math``), multiple choice (``choice``), the arithmetic task's (``arith``),
registered by name in ``registry.py`` (``get_verifier("math", timeout_s=5.0)``).
The trainer calls a ``RewardRouter`` built from the ``reward`` config section
(``router.py``): it picks each row's verifier by ``data_source`` and runs the
user's own function (``custom.py``) where the config names one.
"""

from __future__ import annotations

from echorl_jax.rewards.base import RewardResult, Verifier
from echorl_jax.rewards.custom import CustomReward, RewardRow
from echorl_jax.rewards.math import MathVerifier
from echorl_jax.rewards.registry import VERIFIERS, get_verifier
from echorl_jax.rewards.router import RewardConfig, RewardRouter, build_router, call_verifier, rows_for_batch

__all__ = ["VERIFIERS", "CustomReward", "MathVerifier", "RewardConfig", "RewardResult", "RewardRouter", "RewardRow",
           "Verifier", "build_router", "call_verifier", "get_verifier", "rows_for_batch"]
