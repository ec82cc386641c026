"""Fixed-shape generation: prefill + KV-cache decode in one jitted program.

``make_sampler`` builds ``sample(state, prompt_tokens_np, prompt_lengths_n, rng)
-> Rollout`` for ``N`` distinct prompts and ``G`` samples each (``B = N·G``
rows, group-major: row ``b = n·G + g``). Inside one ``jit``:

1. prefill each distinct prompt once ([N, P]) into a cache of P slots;
2. repeat its cache and last logits G times (group-major);
3. a ``lax.while_loop`` over [B, 1] decode steps that exits as soon as every
   row has emitted a stop token (or completed a stop sequence), or after T
   tokens (``decode_loops.decode_plain``; with ``sampling.slots``, S decode
   slots refilled from the queue of rollouts instead: ``decode_loops.decode_refill``).

Token drawing and the log-probs convention live in ``sampling/draw.py``; stop ids and
stop sequences in ``sampling/stops.py``.

Prompt buckets (``sampling.prompt_buckets``): before prefill the host trims the
left-padding columns of the [N, P] prompt batch to the smallest power of two
(>= 16, capped at P) that holds the longest prompt, and pads the outputs back
to P. Short batches then prefill and attend over, e.g., 64 columns instead of
2,048, at the price of one compiled program per bucket (at most log2(P/16)+1
shapes, ~8 for P = 2,048). Padding is masked, so rollouts are the same.

Shapes are fixed, so the program compiles once per (N, bucket) and config and
is reused every RL step. The sampler takes the nnx ``State`` the trainer trains,
so sampling reads the same sharded parameters: no weight copy.

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

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from echorl_jax.models.transformer import init_cache, positions_from_valid
from echorl_jax.sampling.budget import DecodePlan, choose_layout, plan_decode, rows_for
from echorl_jax.sampling.config import SamplingConfig
from echorl_jax.sampling.decode import decode_block, decode_plain, decode_refill, keep_rows, response_columns, round_up
from echorl_jax.sampling.layout import DecodeLayout, DecodeWeights
from echorl_jax.sampling.step import DecodeStep
from echorl_jax.sampling.stops import as_ids, as_stops, split_stops
from echorl_jax.sharding import batch_divisor, batch_sharding, gather_rows, move_rows, replicated


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


# ----------------------------------------------------------------------------- the sampler


MIN_PROMPT_BUCKET = 16  # narrowest prompt width compiled (prompt_buckets)


def prompt_bucket(max_len: int, p: int) -> int:
    """Prompt width the sampler compiles for prompts of at most ``max_len`` tokens padded to ``p``:
    the smallest power of two >= ``max_len`` (at least ``MIN_PROMPT_BUCKET``), capped at ``p``."""
    return min(p, max(MIN_PROMPT_BUCKET, 1 << max(int(max_len) - 1, 0).bit_length()))


def decode_rows(cfg: SamplingConfig, rollouts: int, divisor: int = 1) -> tuple[int, bool]:
    """``(rows, refill)``: the decode batch for ``rollouts`` = N·G (padded to the mesh's batch
    ``divisor``) and whether slots are refilled. ``sampling.slots`` below N·G turns refill on."""
    return rows_for(cfg.slots, rollouts, divisor)


def kv_bytes_per_slot(mcfg, prompt_len: int, new_tokens: int) -> int:
    """KV-cache bytes of one decode row: 2 (k, v) · layers · kv heads · head dim · (P + T') · dtype
    bytes, with T' = T rounded up to whole key blocks (``decode.decode_block``)."""
    itemsize = jnp.dtype(mcfg.compute_dtype).itemsize
    cols = prompt_len + response_columns(new_tokens, decode_block(new_tokens))
    return 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.dim_per_head * cols * itemsize


class Sampler(DecodeStep):
    """``sampler(params, prompt_tokens_np [N, P], prompt_lengths [N], rng) -> Rollout``.

    ``params`` is the model's nnx State (or the model itself) on any placement, or its decode copy
    (``sampler.decode_weights(state)``, ``sampling/layout.py``): the sampler decodes from a copy in the
    compute dtype laid out for decoding, and makes one per call when given anything else. The
    trainer makes it once per RL step. ``rng`` is a PRNG key or an int seed. In a multi-process
    run each process passes its own prompts (host numpy, the same N on every process) and the
    rollout, a global array, holds every process's prompts in process order. ``traces`` counts how
    often the program was traced (once per distinct input shape). ``last_decode_steps`` (a device
    scalar) is the last call's number of decode iterations: slot occupancy = sum(lengths) / (steps · rows).

    ``prepare(state, prompt_len)`` resolves the memory plan (``sampling/budget.py``: decode layout,
    decode rows from ``sampling.kv_cache_memory``) once; every call does it on first use.

    ``row_ids`` ([N·G] int, default the row index ``arange(N·G)``): row r's draws come from the key
    stream ``fold_in(fold_in(rng, row_ids[r]), t)``, so a row's tokens depend on (rng, its id, its
    prompt) only, not on the batch it is in. Held-out grading keys each sample by its record and
    sample number (``trainer/grading.py``). Multi-process: each process passes its own rows' global ids.

    ``bench_stop_lengths`` ([N·G] int, benchmarks and tests only): rollout r emits the first
    single stop id as its response token number ``bench_stop_lengths[r]`` (1-based) unless it
    stopped earlier, so workloads with a chosen length distribution can be timed.
    """

    def __init__(self, graphdef, cfg: SamplingConfig, group_size: int, stop_ids, pad_id: int, mesh,
                 block: int | None = None, device_memory: int | None = None, decode_devices=None):  # fmt: skip
        block = block or decode_block(cfg.max_new_tokens)
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"decode_block={block!r} is invalid: must be an integer >= 1")
        super().__init__(cfg, group_size, stop_ids, pad_id, mesh, block)
        self.graphdef = graphdef
        self.train_mesh = mesh  # where the rollout goes (self.mesh becomes the decode mesh once prepared)
        self.device_memory = device_memory
        self.decode_devices = decode_devices  # a sampler mesh of its own (mesh.sampler_devices); None: mesh's
        self.layout: DecodeLayout | None = None
        self.plans: dict[int, DecodePlan] = {}  # by prompt width P
        self.traces = 0
        self.last_decode_steps = None
        self._jitted = jax.jit(self._sample, static_argnames=("p_out",))

    @staticmethod
    def _params(state):
        params = state.params if isinstance(state, DecodeWeights) else state
        return nnx.state(params) if isinstance(params, nnx.Module) else params

    def layout_for(self, state) -> DecodeLayout:
        """The decode layout (resolved from the first parameters seen; one per sampler)."""
        if self.layout is None:
            params = self._params(state)
            mcfg = nnx.merge(self.graphdef, params).cfg
            self.layout = choose_layout(self.cfg, mcfg, params, self.train_mesh, self.device_memory, self.decode_devices)
            self.mesh = self.layout.mesh
        return self.layout

    @property
    def out_mesh(self):
        """Where a decode program lays its rollout out (rows over the batch axes): the training mesh, or with
        devices of its own the decode mesh (``to_train_mesh`` then moves the rollout to the training mesh)."""
        return self.mesh if self.decode_devices is not None else self.train_mesh

    def to_train_mesh(self, tree):
        """A decode program's outputs on the training mesh's batch layout (a move only with a sampler mesh)."""
        return tree if self.decode_devices is None else move_rows(tree, self.train_mesh)

    def prepare(self, state, prompt_len: int) -> DecodePlan:
        """The memory plan for prompts of width ``prompt_len`` (resolved once per width)."""
        if prompt_len not in self.plans:
            params = self._params(state)
            mcfg = nnx.merge(self.graphdef, params).cfg
            self.plans[prompt_len] = plan_decode(self.cfg, mcfg, params, self.layout_for(params), prompt_len=prompt_len,
                                                 block=self.block, memory=self.device_memory)  # fmt: skip
        return self.plans[prompt_len]

    def decode_weights(self, state, version: int | None = None) -> DecodeWeights:
        """The decode copy of ``state`` (cast + reshard, ``sampling/layout.py``); the trainer makes it
        once per RL step and drops it after sampling. With a sampler mesh of its own it is a push, tagged
        with the policy ``version``."""
        if isinstance(state, DecodeWeights):
            return state
        return self.layout_for(state).copy(self._params(state), version)

    def __call__(self, state, prompt_tokens, prompt_lengths, rng, *, row_ids=None, bench_stop_lengths=None) -> Rollout:
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
        if row_ids is not None:
            row_ids = np.asarray(row_ids)
            rows = tokens_np.shape[0] * self.group_size
            if row_ids.shape != (rows,):
                raise ValueError(f"row_ids {row_ids.shape}: expected [N·G] = [{rows}]")
            if row_ids.size and (row_ids.min() < -(2**31) or row_ids.max() >= 2**31):
                raise ValueError(f"row_ids must fit int32; got [{row_ids.min()}, {row_ids.max()}]")
            row_ids = row_ids.astype(np.int32)
        if bench_stop_lengths is not None:
            if not self.stop_ids:
                raise ValueError("bench_stop_lengths forces the first single stop id; this sampler has none")
            bench_stop_lengths = np.asarray(bench_stop_lengths, np.int32)
        p_out = tokens_np.shape[1]
        self.prepare(state, p_out)
        params = self.decode_weights(state).params
        if self.mesh is not None and jax.process_count() > 1 and isinstance(tokens_np, np.ndarray):
            # Multi-process: each process passes its own prompts; the batch is all of them in process
            # order (sharding.process_rows finds a process's rows of the result).
            tokens_np, lengths_n = gather_rows(tokens_np), gather_rows(lengths_n)
            if row_ids is not None:
                row_ids = gather_rows(row_ids)
            if bench_stop_lengths is not None:
                bench_stop_lengths = gather_rows(bench_stop_lengths)
        if self.cfg.prompt_buckets and isinstance(lengths_n, np.ndarray) and lengths_n.size:
            # Every process sees the gathered lengths, so all compile the same bucket.
            tokens_np = tokens_np[:, p_out - prompt_bucket(lengths_n.max(), p_out) :]
        if self.mesh is not None:
            put = functools.partial(jax.device_put, device=replicated(self.mesh))
            if jax.process_count() > 1 and rng.is_fully_addressable:  # a key array goes across as its raw data
                rng = jax.random.wrap_key_data(put(np.asarray(jax.random.key_data(rng))), impl=jax.random.key_impl(rng))
            tokens_np, lengths_n, rng = put(tokens_np), put(lengths_n), put(rng)
            if row_ids is not None:
                row_ids = put(row_ids)
            if bench_stop_lengths is not None:
                bench_stop_lengths = put(bench_stop_lengths)
        rollout, self.last_decode_steps = self._jitted(params, tokens_np, lengths_n, rng, row_ids, bench_stop_lengths,
                                                       p_out=p_out)  # fmt: skip
        return self.to_train_mesh(rollout)

    def lower(self, params, prompt_tokens, prompt_lengths, rng):
        """Ahead-of-time lowering for abstract inputs (``jax.ShapeDtypeStruct``s with shardings): the
        memory planner compiles the sampler without parameters or prompts (at the full prompt width).
        ``params`` is the decode copy's abstract form (``plan.layout.abstract(state)``) after
        ``prepare``, or any abstract parameters."""
        p = prompt_tokens.shape[1]
        if p not in self.plans:
            self.prepare(params, p)
        return self._jitted.lower(params, prompt_tokens, prompt_lengths, rng, None, None, p_out=p)

    def _sample(self, state, prompt_np, lengths_n, rng, row_ids_b, stop_at_r, *, p_out: int):
        self.traces += 1
        g_size, pad_id = self.group_size, self.pad_id
        model = nnx.merge(self.graphdef, state)
        mcfg = model.cfg
        n, p = prompt_np.shape
        b = n * g_size
        div = 1 if self.mesh is None else batch_divisor(self.mesh)
        n_pad = round_up(n, div)
        rows, refill = self.plans[p_out].rows(b)

        # 1. prefill the N distinct prompts (rows padded to the batch divisor).
        lengths_n = lengths_n.astype(jnp.int32)
        valid_np = jnp.arange(p)[None, :] >= (p - lengths_n)[:, None]
        prompt_np = jnp.where(valid_np, prompt_np.astype(jnp.int32), pad_id)
        tok = self.rows_sharded(keep_rows(prompt_np, n, n_pad))
        val = self.rows_sharded(keep_rows(valid_np, n, n_pad))
        pos = positions_from_valid(val)
        cache = init_cache(mcfg, n_pad, p)
        if p > 1:  # all but the last token: its logits are unused, so XLA drops the [N, P, V] head
            _, cache = model(tok[:, :-1], pos[:, :-1], val[:, :-1], cache)
        logits_n1v, cache = model(tok[:, -1:], pos[:, -1:], val[:, -1:], cache)
        if stop_at_r is not None:
            stop_at_r = keep_rows(stop_at_r.astype(jnp.int32), b, round_up(b, div))

        # 2-3. decode: one row per rollout, or S slots refilled from the queue of rollouts.
        if refill:
            out = decode_refill(self, model, cache, val, logits_n1v[:, 0], lengths_n, rng, row_ids_b, stop_at_r, b,
                                rows)
        else:
            out = decode_plain(self, model, cache, logits_n1v[:, 0], lengths_n, rng, row_ids_b, stop_at_r, b, rows)

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
        out_mesh = self.out_mesh  # the rollout leaves in the training mesh's batch layout
        if out_mesh is not None and b % batch_divisor(out_mesh) == 0:
            rollout = Rollout(*(jax.lax.with_sharding_constraint(x, batch_sharding(out_mesh, x.ndim))
                                for x in rollout))  # fmt: skip
        return rollout, out.steps


def make_sampler(
    graphdef_or_model,
    cfg: SamplingConfig,
    *,
    group_size: int,
    stop_ids: Sequence[int | Sequence[int]],
    pad_id: int,
    mesh=None,
    decode_block: int | None = None,
    device_memory: int | None = None,
    decode_devices=None,
) -> Sampler:
    """Builds the jitted sampler; call it as ``sample(state, prompt_tokens_np, prompt_lengths, rng)``.

    ``graphdef_or_model``: the ``graphdef`` from ``nnx.split(model)``, or the model.
    ``prompt_tokens_np`` [N, P] int32 are left-padded; ``prompt_lengths`` [N] count
    the real tokens (1..P). The result has ``B = N·group_size`` rows, group-major.
    ``stop_ids``: token ids and/or token-id sequences; a row stops after any of them.
    With ``mesh``, the parameters may sit anywhere on its devices (the decode copy moves them; the
    rollout comes back batch-sharded over ``mesh``).
    ``decode_block``: columns per response key block (default ``decode.decode_block(T)``): a decode
    step reads the prompt and whole blocks up to the live extent.
    ``device_memory``: bytes per device for ``sampling.kv_cache_memory`` fractions and auto tensor
    parallelism (default: what the device reports).
    ``decode_devices``: devices of the sampler's own (``mesh.sampler_devices``): it decodes there from weights
    pushed from ``mesh`` (``sampling/layout.py``) and moves each rollout back to ``mesh``.
    """
    graphdef = nnx.graphdef(graphdef_or_model) if isinstance(graphdef_or_model, nnx.Module) else graphdef_or_model
    return Sampler(graphdef, cfg, group_size, stop_ids, pad_id, mesh, decode_block, device_memory, decode_devices)


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
    stop = as_ids(tokenizer.eos_token_id) if stop_ids is None else as_stops(stop_ids)
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
