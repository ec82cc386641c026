"""Supervised warm start: next-token NLL on worked solutions before RL.

A randomly initialised policy never solves a task, so every GRPO group is
all-fail and there is nothing to learn from (nor to echo). A short SFT run on
the task's generated solutions brings it to a moderate accuracy first.

Batches use the rollout layout (``[B, P+T]``: prompt left-padded in columns
``[0, P)``, ``solution + eos`` right-padded in ``[P, P+T)``), so the loss is
``update.response_logp`` over the response columns — the same code path as the
RL loss. One jitted step ``(params, opt_state, batch) -> (params, opt_state,
metrics)`` is compiled once with explicit shardings and donation. Training
drops the columns that are padding in every row (the default task needs 55 of
``P+T`` = 112), which changes no loss value and halves the cost of a step.
With packing (``rl.pack_rows_per_micro_batch``, rl/packing.py) the step takes
the batch's host plan too and scans packed micro-batches of that many rows per
device, the token count global, so the loss and gradient are the unpacked ones.

The result is cached as a Hugging Face directory under ``cache_dir/<key>``; the
key hashes everything that decides the result (model config and a fingerprint
of its initial weights, SFT config, seed, shapes, records, tokenizer), and the
directory is written to a temp dir first and renamed into place, so an
interrupted run never leaves a cache entry that later loads.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from echorl_jax import sharding
from echorl_jax.data.pipeline import tokenize_prompts
from echorl_jax.models.config import numerics
from echorl_jax.rl import packing, update
from echorl_jax.trainer import storage

CACHE_VERSION = 1  # bump when the training recipe changes, to invalidate old caches
LOG_EVERY = 10


class _OptimConfig(NamedTuple):
    """The fields ``update.make_optimizer`` reads (an ``OptimConfig`` look-alike)."""

    learning_rate: float
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    max_grad_norm: float = 1.0


def optim_config(sft_cfg) -> _OptimConfig:
    """AdamW, linear warmup, cosine decay to ``sft.min_lr_ratio`` of the peak, global-norm clip 1.0."""
    warmup = min(max(sft_cfg.warmup_steps, 0), max(sft_cfg.steps - 1, 0))
    return _OptimConfig(learning_rate=sft_cfg.learning_rate, warmup_steps=warmup,
                        min_lr_ratio=sft_cfg.min_lr_ratio)


# ----------------------------------------------------------------------------- batches


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else tokenizer.eos_token_id)


def build_sft_batch(records: Sequence[dict], tokenizer, prompt_len: int, response_len: int,
                    template: str = "auto", add_bos: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """Records with ``prompt`` and ``solution`` -> rollout-layout arrays.

    Returns ``tokens_bs`` int32 ``[B, P+T]`` (prompt right-aligned at column P,
    ``solution + eos`` from column P, pad elsewhere), ``valid_bs`` bool (real
    tokens) and ``mask_bt`` bool ``[B, T]`` (the loss targets: solution + eos).
    The prompt is rendered exactly as the RL prompt pipeline renders it.
    """
    p, t = prompt_len, response_len
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("SFT needs a tokenizer with an eos token: the model must learn where a response stops")
    for i, r in enumerate(records):
        if not isinstance(r.get("solution"), str) or not r["solution"]:
            raise ValueError(f"SFT record {i} has no 'solution' text (worked solutions are the SFT targets)")
    prompt_ids = tokenize_prompts([r["prompt"] for r in records], tokenizer, template, add_bos)
    solutions = [r["solution"] for r in records]
    solution_ids = list(tokenizer(solutions, add_special_tokens=False)["input_ids"]) if solutions else []

    b = len(records)
    pad = _pad_id(tokenizer)
    tokens_bs = np.full((b, p + t), pad, np.int32)
    valid_bs = np.zeros((b, p + t), bool)
    for i, (q, a) in enumerate(zip(prompt_ids, solution_ids)):
        a = [*a, eos]
        if not 0 < len(q) <= p:
            raise ValueError(f"SFT record {i}: prompt has {len(q)} tokens; it must have 1..{p} (prompt_len)")
        if len(a) > t:
            raise ValueError(f"SFT record {i}: solution + eos has {len(a)} tokens > response_len={t}")
        tokens_bs[i, p - len(q) : p] = q
        tokens_bs[i, p : p + len(a)] = a
        valid_bs[i, p - len(q) : p + len(a)] = True
    return {"tokens_bs": tokens_bs, "valid_bs": valid_bs, "mask_bt": valid_bs[:, p:].copy()}


def _trim(batch: dict[str, np.ndarray], prompt_len: int) -> dict[str, np.ndarray]:
    """Drops the columns that are padding in every row (left of the longest prompt, right of the longest
    response). The loss is unchanged: padding is masked out of attention and positions come from
    ``valid_bs``."""
    valid = batch["valid_bs"]
    real = np.flatnonzero(valid.any(axis=0))
    lo, hi = min(real[0], prompt_len - 1), max(real[-1] + 1, prompt_len + 1)
    return {
        "tokens_bs": batch["tokens_bs"][:, lo:hi],
        "valid_bs": valid[:, lo:hi],
        "mask_bt": batch["mask_bt"][:, : hi - prompt_len],
    }


# ----------------------------------------------------------------------------- loss and step


def sft_loss(graphdef, params, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean NLL of the ``mask_bt`` tokens (temperature 1)."""
    mask_bt = batch["mask_bt"]
    logp_bt, entropy_bt = update.response_logp(
        graphdef, params, batch["tokens_bs"], batch["valid_bs"], mask_bt.shape[1], 1.0
    )
    w_bt = mask_bt.astype(jnp.float32)
    num_tokens = jnp.sum(w_bt)
    denom = jnp.maximum(num_tokens, 1.0)
    loss = -jnp.sum(logp_bt * w_bt) / denom
    metrics = {"loss": loss, "entropy": jnp.sum(entropy_bt * w_bt) / denom, "num_tokens": num_tokens}
    return loss, metrics


def packed_sft_grads(graphdef, params, batch: dict[str, jax.Array], dest_b, pack: packing.PackSpec):
    """``(grads, metrics)`` of ``sft_loss`` over ``batch`` packed by plan ``dest_b``: micro-batch sums over
    the whole batch's token count."""
    num_tokens = jnp.sum(batch["mask_bt"].astype(jnp.float32))
    denom = jnp.maximum(num_tokens, 1.0)

    def loss(params, mb, index):
        logp_bt, entropy_bt = update.packed_logp(graphdef, params, mb["tokens_bs"], index, 1.0)
        w_bt = mb["mask_bt"].astype(jnp.float32)
        value = -jnp.sum(logp_bt * w_bt) / denom
        return value, {"loss": value, "entropy": jnp.sum(entropy_bt * w_bt) / denom}

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def add(carry, mb, index):
        (_, m), g = grad_fn(params, mb, index)
        return update.add_float32(carry[0], g), jax.tree.map(jnp.add, carry[1], m)

    zero = jnp.zeros((), jnp.float32)
    init = (update.zeros_float32(params), {"loss": zero, "entropy": zero})
    grads, metrics = packing.scan_packed(add, init, batch, packing.placement(dest_b, batch["valid_bs"]), pack)
    return grads, dict(metrics, num_tokens=num_tokens)


def make_sft_step(graphdef, optimizer: optax.GradientTransformation, pack: packing.PackSpec | None = None) -> Callable:
    """The un-jitted ``step(params, opt_state, batch) -> (params, opt_state, metrics)``; with ``pack``
    ``step(params, opt_state, batch, dest_b)`` over packed micro-batches."""
    grad_fn = jax.value_and_grad(lambda params, batch: sft_loss(graphdef, params, batch), has_aux=True)

    def step(params, opt_state, batch, dest_b=None):
        update.check_plan(dest_b, pack)
        if dest_b is None:
            (_, metrics), grads = grad_fn(params, batch)
        else:
            grads, metrics = packed_sft_grads(graphdef, params, batch, dest_b, pack)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, dict(metrics, grad_norm=optax.global_norm(grads))

    return step


# ----------------------------------------------------------------------------- cache key


def _corner(x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)[:64, :64] if x.ndim >= 2 else x.reshape(-1)[:4096]
    return x.astype(jnp.float32)


@functools.lru_cache(maxsize=8)
def _corners_fn(mesh) -> Callable:
    return jax.jit(lambda p: jax.tree.map(_corner, p), out_shardings=sharding.replicated(mesh))


def _params_fingerprint(model: nnx.Module, mesh) -> list:
    """Shapes, dtypes and a corner of every parameter: tells apart initial weights (seed, checkpoint).

    A corner (first 64 rows or layers x first 64 columns) rather than the whole array: cheap for any
    model size, gathered replicated so it works on every mesh and host.
    """
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    small = jax.device_get(_corners_fn(mesh)(params))
    out = []
    for name in sorted(params):
        x = params[name]
        digest = hashlib.sha256(np.ascontiguousarray(small[name]).tobytes()).hexdigest()[:16]
        out.append([name, list(x.shape), str(x.dtype), digest])
    return out


def _as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg._asdict())


def cache_key(model: nnx.Module, tokenizer, records: Sequence[dict], sft_cfg, *, mesh, prompt_len: int,
              response_len: int, seed: int, template: str = "auto", add_bos: bool = False) -> str:  # fmt: skip
    """Short hash of everything that determines the warm-started weights (``model`` placed on ``mesh``).

    The mesh itself is not part of the key: it changes only float summation order.
    """
    texts = hashlib.sha256()
    for r in records:
        for field in (r["prompt"], r["solution"]):
            texts.update(json.dumps(field).encode())
            texts.update(b"\0")
    vocab = sorted(tokenizer.get_vocab().items())
    spec = {
        "version": CACHE_VERSION,
        "model": dataclasses.asdict(model.cfg),
        "init": _params_fingerprint(model, mesh),
        "sft": {k: v for k, v in _as_dict(sft_cfg).items() if k != "cache_dir"},  # where, not what
        "optim": optim_config(sft_cfg)._asdict(),
        "seed": seed,
        "shape": [prompt_len, response_len],
        "template": [template, add_bos],
        "records": [len(records), texts.hexdigest()],
        "tokenizer": [hashlib.sha256(json.dumps(vocab).encode()).hexdigest(), tokenizer.eos_token_id,
                      _pad_id(tokenizer), getattr(tokenizer, "bos_token_id", None)],
    }  # fmt: skip
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_cached(path: str, model: nnx.Module, mesh):
    """The parameters stored at ``path`` (a bucket's entry is copied to a local temp dir first), or None when
    the entry is missing, unreadable or does not fit ``model``. ``model`` is left as it is."""
    from echorl_jax.models import hf

    if not storage.isdir(path):
        return None
    cfg = model.cfg
    try:
        with tempfile.TemporaryDirectory(prefix="echorl-warmstart-") as tmp:
            local = path
            if storage.is_remote(path):
                local = os.path.join(tmp, "entry")
                storage.download_dir(path, local)
            loaded = hf.load_model(local, mesh, **numerics(cfg))  # reads the files now
    except (OSError, ValueError):  # unreadable or mismatched entry: retrain and overwrite it
        return None
    new = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    old = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if set(new) != set(old) or any(new[k].shape != old[k].shape or new[k].dtype != old[k].dtype for k in old):
        return None
    return nnx.state(loaded, nnx.Param)


def _store_cached(path: str, model: nnx.Module, tokenizer, replace_stale: bool = False) -> None:
    """Exports to a temp dir beside ``path``, then renames it into place (atomic on one filesystem).

    Several processes may finish the same entry at once (runs sharing ``sft.cache_dir``): the first
    rename wins and the others drop their copy (same key, same weights). An existing entry is removed
    only when ``replace_stale`` (it was there at the start and failed to load)."""
    from echorl_jax.models import hf

    cache_dir = os.path.dirname(path)
    if jax.process_index() != 0:
        hf.export_model(model, path, tokenizer)  # joins the gathers; only process 0 writes
        return
    if storage.is_remote(path):  # a bucket: uploaded file by file, config.json (what a load reads first) last
        with tempfile.TemporaryDirectory(prefix="echorl-warmstart-") as tmp:
            hf.export_model(model, tmp, tokenizer)
            names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
            for name in names:
                with open(os.path.join(tmp, name), "rb") as f:
                    storage.write_bytes(storage.join(path, name), f.read())
        return
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=cache_dir)
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
    try:
        hf.export_model(model, tmp, tokenizer)
        if replace_stale and os.path.isdir(path):
            stale = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.stale-", dir=cache_dir)
            os.replace(path, os.path.join(stale, "entry"))  # atomic: readers see the old entry or none
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process stored this entry first: keep it
            if not os.path.isdir(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- warm start


def _index_stream(rng: np.random.Generator, num_records: int, batch_size: int):
    """Record indices in batches: a fresh permutation each epoch, epochs concatenated."""
    buf = np.empty(0, np.int64)
    while True:
        while len(buf) < batch_size:
            buf = np.concatenate([buf, rng.permutation(num_records)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def warm_start(
    model: nnx.Module,
    tokenizer,
    records: Sequence[dict],
    sft_cfg,
    *,
    mesh,
    prompt_len: int,
    response_len: int,
    cache_dir: str | None,
    seed: int,
    log_fn: Callable[[int, dict[str, float]], Any] | None = None,
    template: str = "auto",
    add_bos: bool = False,
    pack_rows: int = 0,
) -> nnx.Module:
    """``sft_cfg.steps`` AdamW steps on ``records``' worked solutions; updates ``model`` in place and returns it.

    ``log_fn(step, metrics)`` (host floats) runs every ``LOG_EVERY`` steps and after the last one.
    With ``cache_dir`` a finished warm start is reused: same inputs -> weights loaded, no training.
    ``pack_rows > 0`` (``rl.pack_rows_per_micro_batch``): packed micro-batches of that many rows per device
    (the result equals the padded one up to float summation order, so the cache key ignores it).
    """
    if sft_cfg.steps <= 0:
        return model
    if not records:
        raise ValueError("warm start: no records to train on")
    divisor = sharding.batch_divisor(mesh)
    if sft_cfg.batch_size % divisor:
        raise ValueError(
            f"sft.batch_size={sft_cfg.batch_size} must be a multiple of the mesh's batch axes size {divisor}"
        )
    sharding.shard_model(model, mesh)  # no-op when already placed
    path = None
    if cache_dir:
        key = cache_key(model, tokenizer, records, sft_cfg, mesh=mesh, prompt_len=prompt_len,
                        response_len=response_len, seed=seed, template=template, add_bos=add_bos)  # fmt: skip
        path = storage.join(cache_dir, key)
        # Every host must take the same branch: a hit only when every host can load the entry (a local
        # cache_dir on a pod lives on one worker's disk: the others train, and the entry stays there).
        hit = not sharding.any_process(not storage.isdir(path))
        loaded = _load_cached(path, model, mesh) if hit else None
        if hit and not sharding.any_process(loaded is None):
            nnx.update(model, loaded)
            return model

    data = _trim(build_sft_batch(records, tokenizer, prompt_len, response_len, template, add_bos), prompt_len)
    graphdef, params = nnx.split(model)
    param_sh = sharding.state_shardings(params, mesh)
    opt = optim_config(sft_cfg)
    optimizer = update.make_optimizer(opt, sft_cfg.steps)
    schedule = update.make_schedule(opt, sft_cfg.steps)
    opt_state = update.init_opt_state(optimizer, params, mesh)  # moments sharded like their params
    opt_sh = jax.tree.map(lambda x: x.sharding, opt_state)

    indices = _index_stream(np.random.default_rng(seed), len(records), sft_cfg.batch_size)
    pack = None
    if pack_rows:
        width, response = data["tokens_bs"].shape[1], data["mask_bt"].shape[1]
        pack = packing.make_spec(sft_cfg.batch_size, width, response, pack_rows, mesh)
    lengths = data["valid_bs"].sum(axis=1)

    def next_batch():
        rows = next(indices)  # the global batch; each host feeds its own slice of it
        plan = () if pack is None else (packing.put_plan(packing.plan_rows(lengths[rows], pack), mesh),)
        rows = rows.reshape(jax.process_count(), -1)[jax.process_index()]
        return (sharding.shard_batch({k: v[rows] for k, v in data.items()}, mesh), *plan)

    first = next_batch()
    batch_sh = jax.tree.map(lambda x: x.sharding, first)
    step_fn = jax.jit(
        sharding.traced_on(mesh, make_sft_step(graphdef, optimizer, pack)),
        in_shardings=(param_sh, opt_sh, *batch_sh),
        out_shardings=(param_sh, opt_sh, sharding.replicated(mesh)),
        donate_argnums=(0, 1),
    )
    compiled = step_fn.lower(params, opt_state, *first).compile()  # once; every batch has the same shapes

    batch, t0 = first, time.perf_counter()
    for step in range(1, sft_cfg.steps + 1):
        params, opt_state, metrics = compiled(params, opt_state, *batch)
        if step < sft_cfg.steps:
            batch = next_batch()
        if log_fn is not None and (step % LOG_EVERY == 0 or step == sft_cfg.steps):
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            host.update(lr=float(schedule(step - 1)), steps_per_s=step / (time.perf_counter() - t0))
            log_fn(step, host)
    nnx.update(model, params)
    if path is not None:
        _store_cached(path, model, tokenizer, replace_stale=hit)
    return model
