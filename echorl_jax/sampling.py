"""Fixed-shape generation: prefill + KV-cache decode in one jitted program.

``make_sampler`` builds ``sample(state, prompt_tokens_np, prompt_lengths_n, rng)
-> Rollout`` for ``N`` distinct prompts and ``G`` samples each (``B = N·G``
rows, group-major: row ``b = n·G + g``). Inside one ``jit``:

1. prefill each distinct prompt once ([N, P]) into a cache of P slots;
2. repeat its cache and last logits G times (group-major);
3. a ``lax.while_loop`` over [B, 1] decode steps that exits as soon as every
   row has emitted a stop token (or completed a stop sequence), or after T
   tokens. The loop is split into a
   few segments whose cache grows to P + T slots: all rows write the same
   slot, so early steps need not read (attend over) the empty tail — on CPU
   the decode step is dominated by reading the cache.

Continuous batching (``sampling.slots``, 0 < S < N·G): all N prompts are
prefilled once up front into a per-prompt cache [N, P]; S decode slots hold
rollouts. When a rollout stops (or reaches T) its slot takes the next pending
rollout r = n·G + g at the next iteration: prompt n's KV is copied into the
slot's first P cache slots and its first token is drawn from prompt n's
prefill logits. The slot table (rollout id, own step) and the insert step live
inside one ``lax.while_loop`` with fixed shapes; outputs are written per
rollout id, so the Rollout contract is unchanged. Draws use the stream of the
rollout id and the rollout's own step, so a rollout's tokens depend on (seed,
rollout id) only and equal the one-row-per-rollout loop's. The KV cache is
S × (P + T) instead of N·G × (P + T) (``kv_bytes_per_slot``); no segments
(slots are at different steps): every step reads the whole cache, masked.

Prompt buckets (``sampling.prompt_buckets``): before prefill the host trims the
left-padding columns of the [N, P] prompt batch to the smallest power of two
(>= 16, capped at P) that holds the longest prompt, and pads the outputs back
to P. Short batches then prefill and attend over, e.g., 64 columns instead of
2,048, at the price of one compiled program per bucket (at most log2(P/16)+1
shapes, ~8 for P = 2,048). Padding is masked, so rollouts are the same.

Shapes are fixed, so the program compiles once per (N, bucket) and config and
is reused every RL step. The sampler takes the nnx ``State`` the trainer trains,
so sampling reads the same sharded parameters: no weight copy.

Log-probs convention: ``behaviour_logp`` is the log-prob of the sampled token
under softmax(logits / temperature) over the FULL vocabulary and ``entropy`` is
the entropy of that same distribution — exactly what the trainer recomputes
from its own forward. Top-k / top-p only restrict which token is drawn; their
truncation is not folded into the log-prob (the verl / TRL convention), so the
importance ratio is 1 on-policy up to numerics. Greedy decoding reports
log-probs and entropy at temperature 1. Draws are exact inverse-CDF samples
with one uniform per row from the stream fold_in(fold_in(rng, row), step), so
a seed fixes the rollout whatever the mesh.

Stops: ``stop_ids`` entries are token ids or token-id sequences. Single ids
are checked with one ``isin`` per step. Multi-token sequences are a padded
``[S, L]`` constant (right-aligned, -1 = wildcard); each row carries its last
L generated tokens and is done when they end with any sequence. The response
mask covers the whole stop sequence and nothing after; ``stop_len`` says how
many trailing tokens it has, so ``decode_responses`` can leave it out.

Sharding: rows are sharded over the mesh batch axes ``("data", "fsdp")``;
parameters stay on their own shardings. When N (prefill) or B (decode) is not
a multiple of the batch divisor, the program pads rows up to the next multiple
inside the jit (padding rows start "stopped" so they never delay the loop
exit) and slices them off; the returned arrays are batch-sharded when B is
divisible, and left to XLA's choice otherwise.

Shape letters: b rows (B), n prompts (N), p prompt length (P), t response
length (T), s P+T, v vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from echorl_jax.models.transformer import init_cache, positions_from_valid
from echorl_jax.sharding import BATCH_AXES, batch_divisor, batch_sharding, gather_rows, logical_to_spec, replicated


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


class Rollout(NamedTuple):
    """One sampled batch (the rollout batch of docs/training.md); rows group-major, ``b = n·G + g``."""

    tokens: jax.Array  # [B, P+T] int32: left-padded prompt + response, pad_id after the stop
    valid: jax.Array  # [B, P+T] bool: real prompt tokens + response tokens through the first stop
    response_mask: jax.Array  # [B, T] bool: generated tokens up to and including the first stop
    behaviour_logp: jax.Array  # [B, T] f32: log-prob of the token under softmax(logits/temp), 0 off-mask
    entropy: jax.Array  # [B, T] f32: entropy of that full distribution, 0 off-mask
    lengths: jax.Array  # [B] int32: response length including the stop token(s)
    truncated: jax.Array  # [B] bool: no stop token / sequence within T
    stop_len: Any = None  # [B] int32: trailing tokens that form the stop (0 if truncated); None = 1 if stopped


# ----------------------------------------------------------------------------- token choice


def logp_entropy_of(scaled_bv, tokens_b):
    """Log-prob of ``tokens_b`` and entropy under softmax(scaled_bv), one pass over the vocab."""
    m_b = jnp.max(scaled_bv, axis=-1, keepdims=True)
    e_bv = jnp.exp(scaled_bv - m_b)
    z_b = jnp.sum(e_bv, axis=-1)
    logz_b = m_b[:, 0] + jnp.log(z_b)
    # H = log Z - E_p[x]: avoids materialising log_softmax a second time.
    entropy_b = logz_b - jnp.sum(e_bv * scaled_bv, axis=-1) / z_b
    logp_b = jnp.take_along_axis(scaled_bv, tokens_b[:, None], axis=-1)[:, 0] - logz_b
    return logp_b, entropy_b


def _last_positive(x_bc):
    """Index of the last entry > 0 in each row (0 if none)."""
    c = x_bc.shape[-1]
    return c - 1 - jnp.argmax(x_bc[:, ::-1] > 0, axis=-1)


def inverse_cdf(w_bv, u_b, chunk: int = 256):
    """Draws index i with probability w_i / sum(w), one uniform ``u_b`` in [0, 1) per row.

    Two-level inverse CDF: pick a chunk of ``chunk`` entries from the chunk sums,
    then an entry inside it. One pass over the vocab (the chunk sums) and one
    random number per row, instead of a Gumbel draw per vocab entry. Rounding
    can push the target past the last mass; the clamps then pick the last
    entry with positive weight, so a zero-weight entry is never returned.
    """
    b, v = w_bv.shape
    c = min(chunk, v)
    nc = -(-v // c)
    w_bjc = jnp.pad(w_bv, ((0, 0), (0, nc * c - v))).reshape(b, nc, c)
    sum_bj = jnp.sum(w_bjc, axis=-1)
    cum_bj = jnp.cumsum(sum_bj, axis=-1)
    x_b = u_b * cum_bj[:, -1]
    j_b = jnp.minimum(jnp.sum(cum_bj <= x_b[:, None], axis=-1), _last_positive(sum_bj))
    w_bc = jnp.take_along_axis(w_bjc, j_b[:, None, None], axis=1)[:, 0]
    x_b = x_b - jnp.take_along_axis(cum_bj - sum_bj, j_b[:, None], axis=-1)[:, 0]
    cum_bc = jnp.cumsum(w_bc, axis=-1)
    i_b = jnp.minimum(jnp.sum(cum_bc <= x_b[:, None], axis=-1), _last_positive(w_bc))
    return (j_b * c + i_b).astype(jnp.int32)


TOP_P_CANDIDATES = 1024  # top-p alone: the nucleus is looked for among this many top tokens first


def _top_k(x_bv, k: int):
    """``lax.top_k`` kept a TopK op: without the barrier, XLA:CPU turned top-k followed by the
    draw's gather into a full sort of the vocabulary (47 ms vs 1.1 ms at [64, 4096], bench/README.md)."""
    return jax.lax.optimization_barrier(jax.lax.top_k(x_bv, k))


def _truncated_draw(cand_bc, ids_bc, u_b, top_p: float, total_b=None):
    """Inverse-CDF draw among descending candidates, cut to the nucleus when ``top_p < 1``.

    ``total_b``: the full vocabulary's mass relative to the top candidate (default: the
    candidates' own), so a nucleus taken among the top candidates equals the full one.
    """
    w_bc = jnp.exp(cand_bc - cand_bc[:, :1])
    if top_p < 1.0:
        total_b = jnp.sum(w_bc, axis=-1) if total_b is None else total_b
        above_bc = jnp.cumsum(w_bc, axis=-1) - w_bc  # mass strictly above each candidate
        w_bc = jnp.where(above_bc < top_p * total_b[:, None], w_bc, 0.0)  # the top one is always kept
    choice_b = inverse_cdf(w_bc, u_b)
    return jnp.take_along_axis(ids_bc, choice_b[:, None], axis=-1)[:, 0]


def _nucleus_draw(scaled_bv, u_b, top_p: float, candidates: int):
    """Top-p draw without sorting the vocabulary in the common case.

    ``lax.top_k`` picks the ``candidates`` most likely tokens. When, in every row, their
    mass reaches ``top_p`` of the total, the nucleus lies inside them and the draw is the
    same as over the sorted vocabulary (``lax.top_k`` orders ties by index, like the
    stable sort). Otherwise (a very flat distribution in some row) the batch falls back
    to the full sort, so the result is exact either way.
    """
    v = scaled_bv.shape[-1]
    iota = lambda: jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), scaled_bv.shape)  # noqa: E731
    if candidates >= v:
        neg_bv, ids_bv = jax.lax.sort_key_val(-scaled_bv, iota(), dimension=-1)
        return _truncated_draw(-neg_bv, ids_bv, u_b, top_p)
    cand_bc, ids_bc = _top_k(scaled_bv, candidates)
    total_b = jnp.sum(jnp.exp(scaled_bv - cand_bc[:, :1]), axis=-1)
    covered = jnp.all(jnp.sum(jnp.exp(cand_bc - cand_bc[:, :1]), axis=-1) >= top_p * total_b)

    def full_sort():
        neg_bv, ids_bv = jax.lax.sort_key_val(-scaled_bv, iota(), dimension=-1)
        return _truncated_draw(-neg_bv, ids_bv, u_b, top_p, total_b)

    return jax.lax.cond(covered, lambda: _truncated_draw(cand_bc, ids_bc, u_b, top_p, total_b), full_sort)


def choose_tokens(logits_bv, keys_b, cfg: SamplingConfig, top_p_candidates: int = TOP_P_CANDIDATES):
    """Next token per row plus its (full-distribution) log-prob and entropy.

    ``keys_b`` holds one PRNG key per row. The draw is an exact inverse-CDF
    sample from softmax(logits / temperature), restricted first to the top-k
    tokens and then to the nucleus (HF / vLLM order), renormalised. Neither
    restriction sorts the vocabulary: top-k is ``lax.top_k``; top-p alone
    searches the top ``top_p_candidates`` first (``_nucleus_draw``).
    """
    logits_bv = logits_bv.astype(jnp.float32)  # a no-op: the model's logits are fp32 already
    if cfg.greedy:
        tokens_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        return (tokens_b, *logp_entropy_of(logits_bv, tokens_b))
    scaled_bv = logits_bv / cfg.temperature if cfg.temperature != 1.0 else logits_bv
    u_b = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_b)
    v = scaled_bv.shape[-1]
    top_k = cfg.top_k if 0 < cfg.top_k < v else 0
    if not top_k and cfg.top_p >= 1.0:
        m_b = jnp.max(scaled_bv, axis=-1, keepdims=True)
        tokens_b = inverse_cdf(jnp.exp(scaled_bv - m_b), u_b)  # XLA shares this exp with logp_entropy_of
        return (tokens_b, *logp_entropy_of(scaled_bv, tokens_b))
    if top_k:
        cand_bc, ids_bc = _top_k(scaled_bv, top_k)  # sorted descending
        tokens_b = _truncated_draw(cand_bc, ids_bc, u_b, cfg.top_p)
    else:
        tokens_b = _nucleus_draw(scaled_bv, u_b, cfg.top_p, top_p_candidates)
    return (tokens_b, *logp_entropy_of(scaled_bv, tokens_b))


# ----------------------------------------------------------------------------- the sampler


class _Loop(NamedTuple):
    t: jax.Array  # index of the response token the next iteration draws
    cache: Any
    last_tok_b: jax.Array  # token t-1, fed to the model this iteration
    last_valid_b: jax.Array  # whether token t-1 is real (row not stopped before it)
    done_b: jax.Array  # row has emitted a stop token (or is padding)
    hist_bl: jax.Array  # the row's last L generated tokens (L = longest multi-token stop; 0 if none)
    stop_len_b: jax.Array  # tokens of the stop that ended the row (0 while running)
    tokens_bt: jax.Array
    mask_bt: jax.Array
    logp_bt: jax.Array
    entropy_bt: jax.Array


def split_stops(stops) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """``stop_ids`` entries (an id or a sequence of ids) -> (single ids, multi-token sequences)."""
    single, multi = [], []
    for entry in stops:
        seq = (int(entry),) if isinstance(entry, (int, np.integer)) else tuple(int(i) for i in entry)
        if not seq:
            raise ValueError("stop_ids: an empty stop sequence would stop every row at once")
        (single if len(seq) == 1 else multi).append(seq[0] if len(seq) == 1 else seq)
    return tuple(dict.fromkeys(single)), tuple(dict.fromkeys(multi))


def stop_sequence_table(seqs) -> tuple[np.ndarray, np.ndarray]:
    """Sequences -> (ids [S, L] int32 right-aligned, -1 before a shorter one; lengths [S] int32)."""
    width = max((len(q) for q in seqs), default=0)
    ids_sl = np.full((len(seqs), width), -1, np.int32)
    for i, q in enumerate(seqs):
        ids_sl[i, width - len(q) :] = q
    return ids_sl, np.asarray([len(q) for q in seqs], np.int32)


def ends_with_stop(hist_bl, ids_sl, len_s):
    """Longest stop sequence each row's history ends with ([B] int32, 0 = none).

    ``hist_bl`` holds the last L tokens (oldest first); ``ids_sl`` is ``stop_sequence_table``'s.
    """
    match_bs = jnp.all((hist_bl[:, None, :] == ids_sl[None]) | (ids_sl[None] < 0), axis=-1)
    return jnp.max(jnp.where(match_bs, len_s[None], 0), axis=-1, initial=0)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _rows(x, n_keep: int, n_out: int, axis: int = 0):
    """Keeps the first ``n_keep`` rows along ``axis`` and zero-pads to ``n_out``."""
    x = jax.lax.slice_in_dim(x, 0, n_keep, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n_out - n_keep)
    return jnp.pad(x, pad)


MIN_PROMPT_BUCKET = 16  # narrowest prompt width compiled (prompt_buckets)


def prompt_bucket(max_len: int, p: int) -> int:
    """Prompt width the sampler compiles for prompts of at most ``max_len`` tokens padded to ``p``:
    the smallest power of two >= ``max_len`` (at least ``MIN_PROMPT_BUCKET``), capped at ``p``."""
    return min(p, max(MIN_PROMPT_BUCKET, 1 << max(int(max_len) - 1, 0).bit_length()))


def decode_rows(cfg: SamplingConfig, rollouts: int, divisor: int = 1) -> tuple[int, bool]:
    """``(rows, refill)``: the decode batch for ``rollouts`` = N·G (padded to the mesh's batch
    ``divisor``) and whether slots are refilled. ``sampling.slots`` below N·G turns refill on."""
    plain = _round_up(rollouts, divisor)
    slots = _round_up(cfg.slots, divisor)
    return (slots, True) if 0 < slots < plain else (plain, False)


def kv_bytes_per_slot(mcfg, prompt_len: int, new_tokens: int) -> int:
    """KV-cache bytes of one decode row: 2 (k, v) · layers · kv heads · head dim · (P + T) · dtype bytes."""
    itemsize = jnp.dtype(mcfg.compute_dtype).itemsize
    return 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.dim_per_head * (prompt_len + new_tokens) * itemsize


class _Slots(NamedTuple):
    """Slot-refill decode state: S slots decode, outputs are indexed by rollout id r (rows of [B, T])."""

    cache: Any  # [L, S, g, P+T, d]: the slot's prompt at [0, P), response token i at P + i
    rid_s: jax.Array  # rollout each slot decodes (>= B: idle, nothing left to start)
    step_s: jax.Array  # that rollout's next response index (0: just inserted, logits from the prefill)
    last_tok_s: jax.Array  # its token step-1, fed to the model this iteration
    hist_sl: jax.Array
    stop_len_s: jax.Array
    next_rid: jax.Array  # first rollout not yet started
    steps: jax.Array  # loop iterations so far
    tokens_rt: jax.Array
    mask_rt: jax.Array
    logp_rt: jax.Array
    entropy_rt: jax.Array
    done_r: jax.Array  # rollout ended with a stop
    stop_len_r: jax.Array


class _Decoded(NamedTuple):
    """What both decode loops hand back, per rollout (rows padded to the batch divisor)."""

    tokens_bt: jax.Array
    mask_bt: jax.Array
    logp_bt: jax.Array
    entropy_bt: jax.Array
    done_b: jax.Array
    stop_len_b: jax.Array
    steps: jax.Array  # decode iterations (each draws one token per busy row)


class Sampler:
    """``sampler(state, prompt_tokens_np [N, P], prompt_lengths [N], rng) -> Rollout``.

    ``state`` is the model's nnx State (or the model itself). ``rng`` is a PRNG
    key or an int seed. In a multi-process run each process passes its own
    prompts (host numpy, the same N on every process) and the rollout, a global
    array, holds every process's prompts in process order. ``traces`` counts how often the program was traced
    (once per distinct input shape). ``last_decode_steps`` (a device scalar) is the last call's
    number of decode iterations: slot occupancy = sum(lengths) / (steps · rows).

    ``bench_stop_lengths`` ([N·G] int, benchmarks and tests only): rollout r emits the first
    single stop id as its response token number ``bench_stop_lengths[r]`` (1-based) unless it
    stopped earlier, so workloads with a chosen length distribution can be timed.
    """

    def __init__(self, graphdef, cfg: SamplingConfig, group_size: int, stop_ids, pad_id: int, mesh,
                 decode_segments: int = 4):  # fmt: skip
        cfg.validate()
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} is invalid: must be an integer >= 1")
        if not isinstance(decode_segments, int) or decode_segments < 1:
            raise ValueError(f"decode_segments={decode_segments!r} is invalid: must be an integer >= 1")
        self.decode_segments = min(decode_segments, cfg.max_new_tokens)
        self.graphdef, self.cfg, self.group_size = graphdef, cfg, group_size
        self.stop_ids, self.stop_seqs = split_stops(stop_ids)
        self.pad_id, self.mesh = int(pad_id), mesh
        self.traces = 0
        self.last_decode_steps = None
        self._jitted = jax.jit(self._sample, static_argnames=("p_out",))

    def __call__(self, state, prompt_tokens, prompt_lengths, rng, *, bench_stop_lengths=None) -> Rollout:
        if isinstance(state, nnx.Module):
            state = nnx.state(state)
        tokens_np, lengths_n = prompt_tokens, prompt_lengths
        if not isinstance(tokens_np, jax.Array):
            tokens_np = np.asarray(tokens_np, np.int32)
        if not isinstance(lengths_n, jax.Array):
            lengths_n = np.asarray(lengths_n, np.int32)
        if tokens_np.ndim != 2 or lengths_n.shape != tokens_np.shape[:1]:
            raise ValueError(f"prompt tokens {tokens_np.shape} and lengths {lengths_n.shape}: expected [N, P] and [N]")
        if isinstance(lengths_n, np.ndarray) and lengths_n.size and not (
            (lengths_n >= 1).all() and (lengths_n <= tokens_np.shape[1]).all()
        ):
            raise ValueError(f"prompt lengths must be in [1, P={tokens_np.shape[1]}]; got {lengths_n.tolist()}")
        if isinstance(rng, (int, np.integer)):
            rng = jax.random.key(int(rng))
        if bench_stop_lengths is not None:
            if not self.stop_ids:
                raise ValueError("bench_stop_lengths forces the first single stop id; this sampler has none")
            bench_stop_lengths = np.asarray(bench_stop_lengths, np.int32)
        if self.mesh is not None and jax.process_count() > 1 and isinstance(tokens_np, np.ndarray):
            # Multi-process: each process passes its own prompts; the batch is all of them in process
            # order (sharding.process_rows finds a process's rows of the result).
            tokens_np, lengths_n = gather_rows(tokens_np), gather_rows(lengths_n)
            if bench_stop_lengths is not None:
                bench_stop_lengths = gather_rows(bench_stop_lengths)
        p_out = tokens_np.shape[1]
        if self.cfg.prompt_buckets and isinstance(lengths_n, np.ndarray) and lengths_n.size:
            # Every process sees the gathered lengths, so all compile the same bucket.
            tokens_np = tokens_np[:, p_out - prompt_bucket(lengths_n.max(), p_out) :]
        if self.mesh is not None:
            put = functools.partial(jax.device_put, device=replicated(self.mesh))
            if jax.process_count() > 1 and rng.is_fully_addressable:  # a key array goes across as its raw data
                rng = jax.random.wrap_key_data(put(np.asarray(jax.random.key_data(rng))), impl=jax.random.key_impl(rng))
            tokens_np, lengths_n, rng = put(tokens_np), put(lengths_n), put(rng)
            if bench_stop_lengths is not None:
                bench_stop_lengths = put(bench_stop_lengths)
        rollout, self.last_decode_steps = self._jitted(state, tokens_np, lengths_n, rng, bench_stop_lengths,
                                                       p_out=p_out)  # fmt: skip
        return rollout

    def lower(self, state, prompt_tokens, prompt_lengths, rng):
        """Ahead-of-time lowering for abstract inputs (``jax.ShapeDtypeStruct``s with shardings): the
        memory planner compiles the sampler without parameters or prompts (at the full prompt width)."""
        return self._jitted.lower(state, prompt_tokens, prompt_lengths, rng, None, p_out=prompt_tokens.shape[1])

    # -- traced -----------------------------------------------------------------------------

    def _constrain(self, x, spec):
        return x if self.mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def _rows_sharded(self, x):
        return self._constrain(x, P(BATCH_AXES, *([None] * (x.ndim - 1))))

    def _kv_sharded(self, x_lbgkd):
        spec = None if self.mesh is None else logical_to_spec(
            (None, "batch", "kv_heads", None, "head_dim"), x_lbgkd.shape, self.mesh)  # fmt: skip
        return self._constrain(x_lbgkd, spec)

    def _pick(self, logits_bv, keys_b, done_b, hist_bl, stop_len_b, force_b):
        """Draws one token per row; rows already done emit ``pad_id`` with log-prob/entropy 0.

        Returns (token, live: row drew a real token, done after it, logp, entropy, history, stop_len).
        """
        cfg, pad_id = self.cfg, self.pad_id
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

    def _hist(self, rows: int):
        width = max((len(q) for q in self.stop_seqs), default=0)
        return jnp.full((rows, width), -2, jnp.int32)  # -2: no token yet, matches nothing

    def _sample(self, state, prompt_np, lengths_n, rng, stop_at_r, *, p_out: int):
        self.traces += 1
        cfg, g_size, pad_id = self.cfg, self.group_size, self.pad_id
        model = nnx.merge(self.graphdef, state)
        mcfg = model.cfg
        n, p = prompt_np.shape
        t_max, b = cfg.max_new_tokens, n * g_size
        div = 1 if self.mesh is None else batch_divisor(self.mesh)
        n_pad = _round_up(n, div)
        rows, refill = decode_rows(cfg, b, div)

        # 1. prefill the N distinct prompts (rows padded to the batch divisor).
        lengths_n = lengths_n.astype(jnp.int32)
        valid_np = jnp.arange(p)[None, :] >= (p - lengths_n)[:, None]
        prompt_np = jnp.where(valid_np, prompt_np.astype(jnp.int32), pad_id)
        tok = self._rows_sharded(_rows(prompt_np, n, n_pad))
        val = self._rows_sharded(_rows(valid_np, n, n_pad))
        pos = positions_from_valid(val)
        cache = init_cache(mcfg, n_pad, p)
        if p > 1:  # all but the last token: its logits are unused, so XLA drops the [N, P, V] head
            _, cache = model(tok[:, :-1], pos[:, :-1], val[:, :-1], cache)
        logits_n1v, cache = model(tok[:, -1:], pos[:, -1:], val[:, -1:], cache)
        if stop_at_r is not None:
            stop_at_r = _rows(stop_at_r.astype(jnp.int32), b, _round_up(b, div))

        # 2-3. decode: one row per rollout, or S slots refilled from the queue of rollouts.
        if refill:
            out = self._decode_slots(model, cache, val, logits_n1v[:, 0], lengths_n, rng, stop_at_r, b, rows)
        else:
            out = self._decode_rows(model, cache, logits_n1v[:, 0], lengths_n, rng, stop_at_r, b, rows)

        # 4. assemble [B, ...] outputs (drop padding rows); left-pad a bucketed prompt back to p_out.
        mask_bt = out.mask_bt[:b]
        widen = lambda x, fill: jnp.pad(x, ((0, 0), (p_out - p, 0)), constant_values=fill)  # noqa: E731
        rollout = Rollout(
            tokens=jnp.concatenate([widen(jnp.repeat(prompt_np, g_size, axis=0), pad_id), out.tokens_bt[:b]], axis=1),
            valid=jnp.concatenate([widen(jnp.repeat(valid_np, g_size, axis=0), False), mask_bt], axis=1),
            response_mask=mask_bt,
            behaviour_logp=out.logp_bt[:b],
            entropy=out.entropy_bt[:b],
            lengths=jnp.sum(mask_bt, axis=1, dtype=jnp.int32),
            truncated=~out.done_b[:b],
            stop_len=out.stop_len_b[:b],
        )
        if self.mesh is not None and b % div == 0:
            rollout = Rollout(*(jax.lax.with_sharding_constraint(x, batch_sharding(self.mesh, x.ndim))
                                for x in rollout))  # fmt: skip
        return rollout, out.steps

    def _decode_rows(self, model, cache, logits_nv, lengths_n, rng, stop_at_b, b: int, b_pad: int) -> _Decoded:
        """One row per rollout: repeat each prompt's cache G times; rows share the write slot."""
        cfg, g_size, pad_id, mcfg = self.cfg, self.group_size, self.pad_id, model.cfg
        n, p, t_max = lengths_n.shape[0], cache.valid_bk.shape[1], cfg.max_new_tokens

        def expand(x, axis=0):  # group-major repeat, rows padded to b_pad
            return _rows(jnp.repeat(jax.lax.slice_in_dim(x, 0, n, axis=axis), g_size, axis=axis), b, b_pad, axis)

        def grow(cache, slots: int):  # zero-pads the cache's slot axis to `slots`
            extra = slots - cache.valid_bk.shape[1]
            pad_kv = lambda x: self._kv_sharded(jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0))))  # noqa: E731
            valid_bk = self._rows_sharded(jnp.pad(cache.valid_bk, ((0, 0), (0, extra))))
            return cache._replace(k_lbgkd=pad_kv(cache.k_lbgkd), v_lbgkd=pad_kv(cache.v_lbgkd), valid_bk=valid_bk)

        # Decode segment i runs steps [ends[i-1], ends[i]) over a cache of P + ends[i] slots:
        # every row shares the write slot, so early steps need not attend over the empty tail.
        ends = sorted({-(-t_max * (i + 1) // self.decode_segments) for i in range(self.decode_segments)})
        cache = cache._replace(k_lbgkd=expand(cache.k_lbgkd, axis=1), v_lbgkd=expand(cache.v_lbgkd, axis=1),
                               valid_bk=expand(cache.valid_bk))  # fmt: skip
        logits_bv = self._rows_sharded(expand(logits_nv))
        lengths_b = self._rows_sharded(expand(lengths_n))

        # Row keys fold in the global row (= rollout) index, so draws do not depend on the mesh.
        row_keys_b = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(b_pad))
        pad_row_b = jnp.arange(b_pad) >= b

        def pick(logits_bv, t, done_b, hist_bl, stop_len_b):
            keys_b = jax.vmap(jax.random.fold_in, (0, None))(row_keys_b, t)
            force_b = None if stop_at_b is None else t == stop_at_b - 1
            return self._pick(logits_bv, keys_b, done_b, hist_bl, stop_len_b, force_b)

        def write(buf_bt, col_b, t):
            return jax.lax.dynamic_update_slice(buf_bt, col_b[:, None].astype(buf_bt.dtype), (0, t))

        tok0, live0, done0, lp0, ent0, hist0, stop_len0 = pick(logits_bv, 0, pad_row_b, self._hist(b_pad),
                                                               jnp.zeros((b_pad,), jnp.int32))  # fmt: skip
        zeros = lambda dt: self._rows_sharded(jnp.zeros((b_pad, t_max), dt))  # noqa: E731
        init = _Loop(
            t=jnp.ones((), jnp.int32), cache=cache, last_tok_b=tok0, last_valid_b=live0, done_b=done0,
            hist_bl=hist0, stop_len_b=stop_len0,
            tokens_bt=write(jnp.full((b_pad, t_max), pad_id, jnp.int32), tok0, 0),
            mask_bt=write(zeros(bool), live0, 0),
            logp_bt=write(zeros(jnp.float32), lp0, 0),
            entropy_bt=write(zeros(jnp.float32), ent0, 0),
        )  # fmt: skip

        def body(s: _Loop):
            positions_b1 = (lengths_b + s.t - 1)[:, None]  # token t-1 sits at prompt length + t - 1
            logits_b1v, cache = model(s.last_tok_b[:, None], positions_b1, s.last_valid_b[:, None], s.cache)
            tok_b, live_b, done_b, lp_b, ent_b, hist_bl, stop_len_b = pick(
                logits_b1v[:, 0], s.t, s.done_b, s.hist_bl, s.stop_len_b)
            return _Loop(
                s.t + 1, cache, tok_b, live_b, done_b, hist_bl, stop_len_b,
                write(s.tokens_bt, tok_b, s.t), write(s.mask_bt, live_b, s.t),
                write(s.logp_bt, lp_b, s.t), write(s.entropy_bt, ent_b, s.t),
            )  # fmt: skip

        out = init
        for end in ends:  # stops as soon as every row has stopped
            out = out._replace(cache=grow(out.cache, p + end))
            out = jax.lax.while_loop(lambda s, end=end: (s.t < end) & ~jnp.all(s.done_b), body, out)
        return _Decoded(out.tokens_bt, out.mask_bt, out.logp_bt, out.entropy_bt, out.done_b, out.stop_len_b, out.t)

    def _decode_slots(self, model, prompt_cache, prompt_valid_np, logits_nv, lengths_n, rng, stop_at_r, b: int,
                      s_rows: int) -> _Decoded:  # fmt: skip
        """Continuous batching in fixed shapes: ``s_rows`` slots; a slot whose rollout ends takes the
        next pending rollout (ids in group-major order) at the next iteration.

        Inserting rollout r = n·G + g copies prompt n's prefill KV into the slot's first P cache
        slots and clears the rest of its valid row; its first token is drawn from prompt n's
        prefill logits (the slot's forward that iteration feeds a dummy token, marked invalid).
        The last T cache slots are a ring: iteration i writes every row's new key into column
        P + i mod T (one shared column: an in-place dynamic-update-slice; a per-row scatter into
        the layer-scanned cache made XLA copy the whole cache). A rollout lives at most T
        iterations, so it never overwrites its own keys; ``valid_bk`` masks the rest (``ring``).
        Each draw uses the stream fold_in(fold_in(rng, r), t) with t the rollout's own step, and
        each rollout attends over exactly its own prompt and tokens (in ring order: sums may
        differ from the plain loop's in the last bits), so rollouts equal the one-row-per-rollout
        loop's.
        """
        cfg, g_size, pad_id, mcfg = self.cfg, self.group_size, self.pad_id, model.cfg
        p, t_max = prompt_valid_np.shape[1], cfg.max_new_tokens
        b_pad = _round_up(b, 1 if self.mesh is None else batch_divisor(self.mesh))
        pk_lngpd, pv_lngpd = prompt_cache.k_lbgkd, prompt_cache.v_lbgkd

        def insert(cache, ins_s, rid_s):
            """Copies prompt KV into the slots ``ins_s`` (one dynamic-update-slice per inserted slot)."""
            n_s = jnp.minimum(rid_s, b - 1) // g_size
            fresh_sk = jnp.pad(prompt_valid_np[n_s], ((0, 0), (0, t_max)))
            valid_sk = self._rows_sharded(jnp.where(ins_s[:, None], fresh_sk, cache.valid_bk))
            order_s = jnp.argsort(~ins_s, stable=True)  # inserted slots first

            def one(j, kv):
                slot = order_s[j]
                start = (0, slot, 0, 0, 0)
                return tuple(jax.lax.dynamic_update_slice(c, jax.lax.dynamic_slice_in_dim(pc, n_s[slot], 1, axis=1),
                                                          start) for c, pc in zip(kv, (pk_lngpd, pv_lngpd)))  # fmt: skip

            k, v = jax.lax.fori_loop(0, jnp.sum(ins_s, dtype=jnp.int32), one, (cache.k_lbgkd, cache.v_lbgkd))
            return cache._replace(k_lbgkd=self._kv_sharded(k), v_lbgkd=self._kv_sharded(v), valid_bk=valid_sk)

        slots = jnp.arange(s_rows, dtype=jnp.int32)
        empty = init_cache(mcfg, s_rows, p + t_max)
        empty = empty._replace(k_lbgkd=self._kv_sharded(empty.k_lbgkd), v_lbgkd=self._kv_sharded(empty.v_lbgkd),
                               valid_bk=self._rows_sharded(empty.valid_bk))  # fmt: skip
        zeros = lambda dt: self._rows_sharded(jnp.zeros((b_pad, t_max), dt))  # noqa: E731
        init = _Slots(
            cache=insert(empty, slots < b, slots), rid_s=slots, step_s=jnp.zeros_like(slots),
            last_tok_s=jnp.full_like(slots, pad_id), hist_sl=self._hist(s_rows), stop_len_s=jnp.zeros_like(slots),
            next_rid=jnp.asarray(s_rows, jnp.int32), steps=jnp.zeros((), jnp.int32),
            tokens_rt=self._rows_sharded(jnp.full((b_pad, t_max), pad_id, jnp.int32)), mask_rt=zeros(bool),
            logp_rt=zeros(jnp.float32), entropy_rt=zeros(jnp.float32),
            done_r=jnp.zeros((b_pad,), bool), stop_len_r=jnp.zeros((b_pad,), jnp.int32),
        )  # fmt: skip

        def body(st: _Slots):
            active_s = st.rid_s < b
            rid_s = jnp.minimum(st.rid_s, b - 1)  # idle slots compute on a real rollout's inputs, then drop them
            n_s = rid_s // g_size
            fresh_s = st.step_s == 0
            feed_s = active_s & ~fresh_s  # feeds a real token this iteration
            positions_s1 = jnp.maximum(lengths_n[n_s] + st.step_s - 1, 0)[:, None]
            column = p + st.steps % t_max
            logits_s1v, cache = model(st.last_tok_s[:, None], positions_s1, feed_s[:, None],
                                      st.cache._replace(pos=column), ring=True)  # fmt: skip
            logits_sv = jax.lax.cond(jnp.any(fresh_s), lambda: jnp.where(fresh_s[:, None], logits_nv[n_s],
                                                                         logits_s1v[:, 0]),
                                     lambda: logits_s1v[:, 0])  # fmt: skip
            keys_s = jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(rng, r), t))(rid_s, st.step_s)
            force_s = None if stop_at_r is None else st.step_s == stop_at_r[rid_s] - 1
            tok_s, _, done_s, lp_s, ent_s, hist_sl, stop_len_s = self._pick(
                logits_sv, keys_s, ~active_s, st.hist_sl, st.stop_len_s, force_s)

            # Per-rollout outputs: idle slots write out of bounds (dropped).
            at_r = jnp.where(active_s, rid_s, b_pad)

            def put(buf_rt, col_s):
                return buf_rt.at[at_r, st.step_s].set(col_s.astype(buf_rt.dtype), mode="drop")

            finished_s = active_s & (done_s | (st.step_s == t_max - 1))
            end_r = jnp.where(finished_s, rid_s, b_pad)
            # Refill: the k-th finished slot (in slot order) takes rollout next_rid + k; past B it idles.
            new_rid_s = jnp.where(finished_s, st.next_rid + jnp.cumsum(finished_s, dtype=jnp.int32) - 1, st.rid_s)
            cache = insert(cache, finished_s & (new_rid_s < b), new_rid_s)
            return _Slots(
                cache=cache, rid_s=new_rid_s, step_s=jnp.where(finished_s, 0, st.step_s + 1),
                last_tok_s=tok_s, hist_sl=jnp.where(finished_s[:, None], -2, hist_sl),
                stop_len_s=jnp.where(finished_s, 0, stop_len_s),
                next_rid=st.next_rid + jnp.sum(finished_s, dtype=jnp.int32), steps=st.steps + 1,
                tokens_rt=put(st.tokens_rt, tok_s), mask_rt=put(st.mask_rt, active_s),
                logp_rt=put(st.logp_rt, lp_s), entropy_rt=put(st.entropy_rt, ent_s),
                done_r=st.done_r.at[end_r].set(done_s, mode="drop"),
                stop_len_r=st.stop_len_r.at[end_r].set(stop_len_s, mode="drop"),
            )  # fmt: skip

        out = jax.lax.while_loop(lambda st: jnp.any(st.rid_s < b), body, init)
        return _Decoded(out.tokens_rt, out.mask_rt, out.logp_rt, out.entropy_rt, out.done_r, out.stop_len_r,
                        out.steps)  # fmt: skip


def make_sampler(
    graphdef_or_model,
    cfg: SamplingConfig,
    *,
    group_size: int,
    stop_ids: Sequence[int | Sequence[int]],
    pad_id: int,
    mesh=None,
    decode_segments: int = 4,
) -> Sampler:
    """Builds the jitted sampler; call it as ``sample(state, prompt_tokens_np, prompt_lengths, rng)``.

    ``graphdef_or_model``: the ``graphdef`` from ``nnx.split(model)``, or the model.
    ``prompt_tokens_np`` [N, P] int32 are left-padded; ``prompt_lengths`` [N] count
    the real tokens (1..P). The result has ``B = N·group_size`` rows, group-major.
    ``stop_ids``: token ids and/or token-id sequences; a row stops after any of them.
    With ``mesh``, parameters must already be on it (``sharding.shard_model``).
    ``decode_segments``: the decode loop runs in this many pieces whose cache holds
    P + T·i/n slots, so early steps attend over fewer empty slots (each piece
    compiles its own loop body; 1 = one loop over P + T slots).
    """
    graphdef = nnx.graphdef(graphdef_or_model) if isinstance(graphdef_or_model, nnx.Module) else graphdef_or_model
    return Sampler(graphdef, cfg, group_size, stop_ids, pad_id, mesh, decode_segments)


# ----------------------------------------------------------------------------- text helpers


def decode_responses(tokenizer, rollout: Rollout, **decode_kwargs) -> list[str]:
    """Response text per row: tokens up to, but excluding, the stop token(s)."""
    t = rollout.response_mask.shape[1]
    tokens_bt = np.asarray(rollout.tokens)[:, -t:]
    stop_len = rollout.stop_len if rollout.stop_len is not None else ~np.asarray(rollout.truncated)
    n_b = np.asarray(rollout.lengths) - np.asarray(stop_len).astype(np.int32)
    rows = [tokens_bt[i, : n_b[i]].tolist() for i in range(len(n_b))]
    if hasattr(tokenizer, "batch_decode"):  # HF fast tokenizers decode a batch in one Rust call
        return list(tokenizer.batch_decode(rows, **decode_kwargs))
    return [tokenizer.decode(row, **decode_kwargs) for row in rows]


def _as_ids(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in (x if isinstance(x, (list, tuple)) else [x]))


def _as_stops(stops) -> tuple:
    """Hashable stop entries: ints stay ints, sequences become tuples."""
    return tuple(int(s) if isinstance(s, (int, np.integer)) else tuple(int(i) for i in s) for s in stops)


@functools.lru_cache(maxsize=8)
def _cached_sampler(graphdef, cfg, group_size, stop_ids, pad_id, mesh) -> Sampler:
    return make_sampler(graphdef, cfg, group_size=group_size, stop_ids=stop_ids, pad_id=pad_id, mesh=mesh)


def tokenize_left_padded(tokenizer, prompts: Sequence[str], pad_id: int, add_special_tokens: bool = True):
    """Plain strings -> (tokens [N, P] int32 left-padded with ``pad_id``, lengths [N] int32)."""
    ids = [list(tokenizer.encode(p, add_special_tokens=add_special_tokens)) for p in prompts]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenizes to no tokens; the sampler needs >= 1")
    p = max(len(r) for r in ids)
    tokens = np.full((len(ids), p), pad_id, np.int32)
    for i, row in enumerate(ids):
        tokens[i, p - len(row):] = row
    return tokens, np.asarray([len(r) for r in ids], np.int32)


def generate_text(
    model: nnx.Module,
    tokenizer,
    prompts: Sequence[str],
    cfg: SamplingConfig = SamplingConfig(),
    group_size: int = 1,
    *,
    seed: int = 0,
    stop_ids: Sequence[int | Sequence[int]] | None = None,
    pad_id: int | None = None,
    mesh=None,
    add_special_tokens: bool = True,
) -> list[str]:
    """Samples ``group_size`` responses per plain prompt string; returns ``N·G`` texts, group-major.

    No chat template is applied (see ``data.render_prompt``). ``stop_ids``
    (ids and/or id sequences) defaults to the tokenizer's eos id(s); ``pad_id``
    to its pad (else the first single stop) id.
    Samplers are cached per (model structure, config), so repeated calls with
    the same prompt shape do not recompile.
    """
    if not prompts:
        return []
    stop = _as_ids(tokenizer.eos_token_id) if stop_ids is None else _as_stops(stop_ids)
    if pad_id is None:
        single = split_stops(stop)[0]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (single[0] if single else 0)
    tokens_np, lengths_n = tokenize_left_padded(tokenizer, prompts, pad_id, add_special_tokens)
    graphdef, state = nnx.split(model)
    try:
        sampler = _cached_sampler(graphdef, cfg, group_size, stop, int(pad_id), mesh)
    except TypeError:  # unhashable graphdef: build a fresh one
        sampler = make_sampler(graphdef, cfg, group_size=group_size, stop_ids=stop, pad_id=pad_id, mesh=mesh)
    rollout = sampler(state, tokens_np, lengths_n, jax.random.key(seed))
    return decode_responses(tokenizer, rollout)
