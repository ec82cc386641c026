"""The ``sampling`` config section: how responses are drawn (a type below every sampling module)."""

from __future__ import annotations

import dataclasses
import math

MIN_BUDGET_BYTES = 4096  # sampling.kv_cache_memory >= 1 is bytes; fewer than 4 KiB is surely a mistyped fraction


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How responses are drawn (the ``sampling`` config section)."""

    temperature: float = 1.0  # softmax temperature for drawing and for behaviour_logp / entropy
    top_p: float = 1.0  # nucleus: smallest top set with probability >= top_p (1.0 = off)
    top_k: int = 0  # draw among the k most likely tokens (0 = off)
    greedy: bool = False  # argmax decoding; logp / entropy then use temperature 1
    max_new_tokens: int = 64  # T: response length the batch is padded to
    slots: int = 0  # decode rows with slot refill (continuous batching); 0 or >= N·G: one row per rollout
    prompt_buckets: bool = True  # trim the prompt batch's left padding to a power-of-two width before prefill
    # KV-cache budget per device, from which the decode slots are chosen (slot refill through them):
    # 0 < x < 1 a fraction of the device's memory, x >= 1 bytes (e.g. 20e9); 0 = off (sampling.slots decides)
    kv_cache_memory: float = 0.0
    decode_tensor_parallel: int = 0  # devices per tensor-parallel group of the decode copy; 0 = auto (sampling/layout.py)

    def validate(self, prefix: str = "sampling") -> None:
        def bad(key, allowed):
            raise ValueError(f"{prefix}.{key}={getattr(self, key)!r} is invalid: {allowed}")

        temperature = self.temperature
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            bad("temperature", "must be a finite number > 0 (use greedy=True for argmax decoding)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", "must be in (0, 1]; 1.0 turns nucleus sampling off")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0; 0 turns top-k off")
        if not isinstance(self.greedy, bool):
            bad("greedy", "must be True or False")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not isinstance(self.slots, int) or isinstance(self.slots, bool) or self.slots < 0:
            bad("slots", "must be an integer >= 0; 0 decodes one row per rollout (no refill)")
        if not isinstance(self.prompt_buckets, bool):
            bad("prompt_buckets", "must be True or False")
        budget = self.kv_cache_memory
        if not (isinstance(budget, (int, float)) and not isinstance(budget, bool) and math.isfinite(budget)
                and (budget == 0 or 0 < budget < 1 or budget >= MIN_BUDGET_BYTES)):  # fmt: skip
            bad("kv_cache_memory", f"must be 0 (off), a fraction of the device's memory in (0, 1), or bytes "
                f">= {MIN_BUDGET_BYTES} (e.g. 20e9)")  # fmt: skip
        if budget and self.slots:
            bad("kv_cache_memory", f"and sampling.slots={self.slots} are both set: sampling.slots fixes the decode "
                "rows, sampling.kv_cache_memory chooses them from a memory budget; set one (the other to 0)")  # fmt: skip
        tp = self.decode_tensor_parallel
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 0:
            bad("decode_tensor_parallel", "must be an integer >= 0; 0 picks the group size automatically")
