"""EchoRL: recover a learning signal from all-success prompt groups.

When every rollout of a group is verified correct, group-relative advantages
are zero and the policy gradient vanishes. EchoRL picks, per eligible group,
the highest-entropy reasoning step among the successful rollouts and adds an
NLL ("echo") loss on the prefix of that rollout ending at that step.

Rules (fixed shapes, no Python loops over the batch; docs/objectives.md):

* Steps. A step ends with, and includes, a delimiter token (any id in
  ``delimiter_ids``; negative ids are padding and never match). Which ids delimit is
  ``EchoConfig.delimiter_ids`` (``resolve_delimiters``): ``auto`` (every non-special token
  whose text contains a newline) or a given list (the paper's code: Qwen2.5's "\n" and
  "\n\n", ids 198 and 271). The last step
  ends at the last response token. A response with no delimiter is one step;
  an empty response (mask all False) has no steps and can never be chosen.
* Truncated responses (no stop token within T) are treated like any other
  response: their last step ends at position T-1. They are only used when
  their reward passes ``success_threshold`` (overlong shaping usually
  prevents that).
* Step entropy ``H(s)`` = mean of ``entropy_bt`` over the step's tokens.
* Eligibility. ``all_success``: every reward of the group >= threshold (the
  paper). ``any_success``: at least one does. Only successful rollouts of an
  eligible group contribute steps. Steps shorter than ``min_step_len`` tokens
  are not candidates. A group with no candidate step gets no clip.
* Choice. ``s* = argmax H(s)`` over the pooled steps. Ties: lowest row
  (rollout index g), then earliest step. The clip is the prefix of the owning
  rollout from its first response token through the end of ``s*``.
* ``top_k > 1``: the k best rollouts of the group, each ranked by its own best
  step (same tie rule), one clip per rollout. Clips come from *distinct*
  rollouts so a ``[B, T]`` bool mask holds them exactly and nested prefixes
  of one rollout never double-count tokens. ``top_k = 1`` equals the pooled argmax.

``echo_loss`` divides by the global clip count, so summing it over
micro-batches equals the whole-batch value.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from echorl_jax.rl.segments import ROWS

ELIGIBILITY = ("all_success", "any_success")


@dataclasses.dataclass(frozen=True)
class EchoConfig:
    enabled: bool = True  # add the echo loss to the RLVR loss
    coef: float = 0.001  # lambda: weight of L_echo in the total loss
    eligible: str = "all_success"  # which groups give clips: all_success | any_success
    success_threshold: float = 1.0  # a rollout is successful when reward >= this
    min_step_len: int = 1  # steps shorter than this (tokens) cannot be chosen
    top_k: int = 1  # clips per group, from distinct rollouts (paper: 1)
    # Step delimiters: "auto" (every non-special token whose text contains a newline) or a list of token ids
    # and/or one-token texts, e.g. (198, 271) or ("\n", "\n\n"); resolved with the tokenizer at start-up.
    delimiter_ids: str | tuple = "auto"

    def __post_init__(self):
        object.__setattr__(self, "delimiter_ids", parse_delimiter_spec(self.delimiter_ids))

    def validate(self) -> "EchoConfig":
        if self.eligible not in ELIGIBILITY:
            raise ValueError(f"echo.eligible={self.eligible!r} is not allowed; expected one of {list(ELIGIBILITY)}")
        for name, ok, what in (
            ("coef", self.coef >= 0, ">= 0"),
            ("min_step_len", self.min_step_len >= 1, ">= 1"),
            ("top_k", self.top_k >= 1, ">= 1"),
            ("success_threshold", self.success_threshold == self.success_threshold, "a number, not NaN"),
        ):
            if not ok:
                raise ValueError(f"echo.{name}={getattr(self, name)!r} is invalid; expected {what}")
        return self


class EchoClips(NamedTuple):
    mask_bt: jax.Array  # bool [B, T]: tokens of the chosen clips
    metrics: dict  # scalars, see echo_clips


AUTO_RULE = "echo.delimiter_ids=auto: every non-special token whose text contains a newline"
_SPEC_HELP = ("expected 'auto' or a non-empty list of token ids (ints >= 0) and/or one-token texts, "
              "e.g. [198, 271] or ['\\n', '\\n\\n']")


def parse_delimiter_spec(value) -> str | tuple:
    """``echo.delimiter_ids`` as given (a config value or a command-line string) -> ``"auto"`` or a tuple of
    ids (int) and texts (str). A string other than ``auto`` is read as a Python literal: ``[198,271]``,
    ``198``, ``"'\\n'"``."""
    key = f"echo.delimiter_ids={value!r}"
    if isinstance(value, str):
        if value.strip() == "auto":
            return "auto"
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{key}: {_SPEC_HELP}") from None
    if isinstance(value, (int, str)):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{key}: {_SPEC_HELP}")
    for item in value:
        ok_id = isinstance(item, int) and not isinstance(item, bool) and item >= 0
        if not (ok_id or (isinstance(item, str) and item)):
            raise ValueError(f"{key}: {item!r} is neither a token id nor a text; {_SPEC_HELP}")
    return tuple(value)


def resolve_delimiters(tokenizer, spec) -> tuple[list[int], str]:
    """``(sorted ids, rule)`` for ``echo.delimiter_ids``: ``auto`` -> ``discover_delimiters``; else each id
    (within the tokenizer's vocabulary) and each text's single token. A text the tokenizer does not encode as
    exactly one token that decodes back to it is refused (ValueError naming the key and value)."""
    spec = parse_delimiter_spec(spec)
    if spec == "auto":
        return discover_delimiters(tokenizer), AUTO_RULE
    vocab, ids = len(tokenizer), set()
    key = f"echo.delimiter_ids={list(spec)!r}"
    for item in spec:
        if isinstance(item, str):
            got = list(tokenizer.encode(item, add_special_tokens=False))
            if len(got) != 1 or tokenizer.decode(got, skip_special_tokens=False,
                                                  clean_up_tokenization_spaces=False) != item:
                raise ValueError(f"{key}: the text {item!r} is not one token of this tokenizer (it encodes to "
                                 f"{got}); give its token id, or a text that is one token")  # fmt: skip
            item = int(got[0])
        if not 0 <= item < vocab:
            raise ValueError(f"{key}: id {item} is outside the tokenizer's vocabulary (0..{vocab - 1})")
        ids.add(item)
    return sorted(ids), f"echo.delimiter_ids={list(spec)!r}"


def discover_delimiters(tokenizer) -> list[int]:
    """Every non-special token id whose decoded text contains a newline."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids = [i for i in range(len(tokenizer)) if i not in special]
    batch_decode = getattr(tokenizer, "batch_decode", None)
    texts = batch_decode([[i] for i in ids]) if batch_decode else [tokenizer.decode([i]) for i in ids]
    return [i for i, text in zip(ids, texts) if "\n" in text]


def is_delimiter(tokens_bt: jax.Array, delimiter_ids: jax.Array) -> jax.Array:
    """bool [B, T]: token is one of ``delimiter_ids`` (binary search, no [B,T,D] blow-up)."""
    if delimiter_ids.shape[0] == 0:
        return jnp.zeros(tokens_bt.shape, bool)
    sorted_d = jnp.sort(delimiter_ids.astype(tokens_bt.dtype))
    idx_bt = jnp.clip(jnp.searchsorted(sorted_d, tokens_bt), 0, sorted_d.shape[0] - 1)
    return (sorted_d[idx_bt] == tokens_bt) & (tokens_bt >= 0)


def step_ends(tokens_bt, mask_bt, delimiter_ids) -> jax.Array:
    """bool [B, T]: position t is the last token of a step."""
    mask_bt = mask_bt.astype(bool)
    T = mask_bt.shape[1]
    t_bt = jnp.arange(T)[None, :]
    last_t_b = jnp.max(jnp.where(mask_bt, t_bt, -1), axis=1)  # -1 for empty rows
    return mask_bt & (is_delimiter(tokens_bt, delimiter_ids) | (t_bt == last_t_b[:, None]))


def _segmented_cumsum(values_bt, start_bt):
    """Running sum along T that restarts where ``start_bt`` is True (step-local, so
    no precision loss from long-row prefix sums)."""

    def combine(a, b):
        (va, fa), (vb, fb) = a, b
        return jnp.where(fb, vb, va + vb), fa | fb

    out_bt, _ = jax.lax.associative_scan(combine, (values_bt, start_bt), axis=1)
    return out_bt


def step_stats(entropy_bt, mask_bt, end_bt):
    """Per-step mean entropy and length, stored at each step's end position.

    Returns ``(mean_entropy_bt, step_len_bt)``; both are 0 away from step ends.
    """
    mask_bt = mask_bt.astype(bool)
    start_bt = jnp.pad(end_bt[:, :-1], ((0, 0), (1, 0)), constant_values=True)
    h_bt = jnp.where(mask_bt, entropy_bt.astype(jnp.float32), 0.0)
    sum_bt = _segmented_cumsum(h_bt, start_bt)
    len_bt = _segmented_cumsum(mask_bt.astype(jnp.int32), start_bt)
    len_bt = jnp.where(end_bt, len_bt, 0)
    mean_bt = jnp.where(end_bt, sum_bt / jnp.maximum(len_bt, 1), 0.0)
    return mean_bt, len_bt


def group_outcomes(reward_ng, threshold: float):
    """bool ``(success_ng, all_success_n, all_fail_n)``.

    The threshold is compared in the reward's dtype, so rewards of 0.9 (float32) pass
    ``success_threshold=0.9`` whatever precision the threshold was given in.
    """
    success_ng = reward_ng >= jnp.asarray(threshold, reward_ng.dtype)
    return success_ng, success_ng.all(axis=1), ~success_ng.any(axis=1)


def echo_clips(tokens_bt, mask_bt, entropy_bt, reward_ng, delimiter_ids, cfg: EchoConfig) -> EchoClips:
    """Choose EchoClips. tokens/mask/entropy are response-only ``[B, T]``, rows group-major."""
    N, G = reward_ng.shape
    B, T = mask_bt.shape
    mask_bt = mask_bt.astype(bool)
    f32 = jnp.float32
    t_bt = jnp.arange(T)[None, :]

    success_ng, all_success_n, all_fail_n = group_outcomes(reward_ng, cfg.success_threshold)
    eligible_n = all_success_n if cfg.eligible == "all_success" else ~all_fail_n
    row_ok_b = (eligible_n[:, None] & success_ng).reshape(B)

    end_bt = step_ends(tokens_bt, mask_bt, delimiter_ids)
    mean_bt, len_bt = step_stats(entropy_bt, mask_bt, end_bt)
    cand_bt = end_bt & (len_bt >= cfg.min_step_len) & row_ok_b[:, None]
    score_bt = jnp.where(cand_bt, mean_bt, -jnp.inf)

    # Best step of each row; argmax takes the first max -> earliest step wins ties.
    best_t_b = jnp.argmax(score_bt, axis=1)
    best_score_b = jnp.take_along_axis(score_bt, best_t_b[:, None], axis=1)[:, 0]
    has_cand_b = cand_bt.any(axis=1)

    # Rank rows within the group: score desc, then lowest row (stable sort).
    key_ng = jnp.where(has_cand_b, -best_score_b, jnp.inf).reshape(N, G)
    order_ng = jnp.argsort(key_ng, axis=1, stable=True)
    rank_ng = jnp.argsort(order_ng, axis=1)
    chosen_b = ((rank_ng < cfg.top_k).reshape(B)) & has_cand_b

    clip_bt = chosen_b[:, None] & mask_bt & (t_bt <= best_t_b[:, None])

    # Metrics (all scalars, computed on the whole rollout batch).
    resp_len_b = mask_bt.sum(axis=1).astype(f32)
    num_clips = chosen_b.sum().astype(f32)
    per_clip = lambda x_b: jnp.where(chosen_b, x_b, 0.0).sum() / jnp.maximum(num_clips, 1.0)
    nonempty = jnp.maximum(mask_bt.any(axis=1).sum().astype(f32), 1.0)
    metrics = {
        "frac_all_success": all_success_n.mean(dtype=f32),
        "frac_all_fail": all_fail_n.mean(dtype=f32),
        "frac_mixed": (~all_success_n & ~all_fail_n).mean(dtype=f32),
        "frac_eligible": eligible_n.mean(dtype=f32),
        "num_clips": num_clips,
        "mean_clip_len": per_clip(clip_bt.sum(axis=1).astype(f32)),
        # Where s* ends inside its rollout: (end of s*) / (response length), in (0, 1].
        "mean_clip_rel_pos": per_clip((best_t_b + 1).astype(f32) / jnp.maximum(resp_len_b, 1.0)),
        "mean_clip_step_entropy": per_clip(jnp.where(chosen_b, best_score_b, 0.0)),
        "mean_steps_per_response": end_bt.sum().astype(f32) / nonempty,
    }
    return EchoClips(mask_bt=clip_bt, metrics=metrics)


def echo_loss(logp_bt, echo_mask_bt, num_clips, layout=ROWS) -> jax.Array:
    """L_echo = sum over clips of the clip's mean NLL, / global ``num_clips``.

    Each sequence holds at most one clip, so the per-clip length is local to a sequence and
    the sum over micro-batches equals the whole-batch value. ``layout``: rows (``ROWS``) or a
    packed batch's ``Segments`` (rl/segments.py).
    """
    m_bt = echo_mask_bt.astype(bool)
    clip_len_b = layout.seq_sum(m_bt).astype(jnp.float32)
    nll_b = -layout.seq_sum(jnp.where(m_bt, logp_bt, 0.0)) / jnp.maximum(clip_len_b, 1.0)
    return nll_b.sum() / jnp.maximum(num_clips, 1.0)
