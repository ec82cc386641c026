"""What one decode step does besides the model call, shared by the sampler and its decode loops.

``DecodeStep`` holds the sampler's settings (config, group size, stops, pad id, mesh) and the
traced per-step helpers: draw a token per row and detect stops (``pick``), the stop-sequence
history (``hist``), and the sharding constraints on rows and KV caches. ``sampler.Sampler``
is a ``DecodeStep``; ``decode.py``'s loops take one, so neither imports the other's module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from echorl_jax.sampling.config import SamplingConfig
from echorl_jax.sampling.draw import choose_tokens, logp_entropy_of
from echorl_jax.sampling.stops import ends_with_stop, split_stops, stop_sequence_table
from echorl_jax.sharding import BATCH_AXES, logical_to_spec


class DecodeStep:
    """Settings and traced per-step helpers of one sampler."""

    def __init__(self, cfg: SamplingConfig, group_size: int, stop_ids, pad_id: int, mesh, block: int):
        cfg.validate()
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} is invalid: must be an integer >= 1")
        self.block = block  # columns per response key block of the KV cache (sampling/decode.py)
        self.cfg, self.group_size = cfg, group_size
        self.stop_ids, self.stop_seqs = split_stops(stop_ids)
        self.pad_id, self.mesh = int(pad_id), mesh

    def block_size(self) -> int:
        return self.block

    def constrain(self, x, spec):
        return x if self.mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def rows_sharded(self, x):
        return self.constrain(x, P(BATCH_AXES, *([None] * (x.ndim - 1))))

    def kv_sharded(self, x_lbgkd):
        spec = None if self.mesh is None else logical_to_spec(
            (None, "batch", "kv_heads", None, "head_dim"), x_lbgkd.shape, self.mesh)  # fmt: skip
        return self.constrain(x_lbgkd, spec)

    def pick(self, logits_bv, keys_b, done_b, hist_bl, stop_len_b, force_b):
        """Draws one token per row; rows already done emit ``pad_id`` with log-prob/entropy 0.

        Returns (token, live: row drew a real token, done after it, logp, entropy, history, stop_len).
        """
        cfg, pad_id = self.cfg, self.pad_id
        # Whole vocabulary rows on each device (the decode layout splits the output layer over its
        # tensor-parallel group): the draw's sort / cumsum then run as on one device.
        logits_bv = self.rows_sharded(logits_bv)
        tok_b, logp_b, ent_b = choose_tokens(logits_bv, keys_b, cfg)
        if force_b is not None:  # bench/test hook: the first stop id, with its log-prob under the model
            stop_b = jnp.full_like(tok_b, self.stop_ids[0])
            scaled_bv = logits_bv.astype(jnp.float32) / (1.0 if cfg.greedy else cfg.temperature)
            tok_b = jnp.where(force_b, stop_b, tok_b)
            logp_b = jnp.where(force_b, logp_entropy_of(scaled_bv, stop_b)[0], logp_b)
        live_b = ~done_b
        tok_b = jnp.where(live_b, tok_b, pad_id)
        stop_ids = jnp.asarray(self.stop_ids or (-1,), jnp.int32)
        hit_b = jnp.isin(tok_b, stop_ids).astype(jnp.int32) if self.stop_ids else jnp.zeros_like(tok_b)
        if self.stop_seqs:  # shift in the new token, then match every sequence at once
            seq_ids_sl, seq_len_s = (jnp.asarray(x) for x in stop_sequence_table(self.stop_seqs))
            hist_bl = jnp.concatenate([hist_bl[:, 1:], tok_b[:, None]], axis=1)
            hit_b = jnp.maximum(hit_b, ends_with_stop(hist_bl, seq_ids_sl, seq_len_s))
        stop_b = live_b & (hit_b > 0)
        stop_len_b = jnp.where(stop_b, hit_b, stop_len_b)
        return (tok_b, live_b, done_b | stop_b, jnp.where(live_b, logp_b, 0.0), jnp.where(live_b, ent_b, 0.0),
                hist_bl, stop_len_b)  # fmt: skip

    def hist(self, rows: int):
        width = max((len(q) for q in self.stop_seqs), default=0)
        return jnp.full((rows, width), -2, jnp.int32)  # -2: no token yet, matches nothing
