"""The memory planner (plan.py) on the tiny config over 8 fake CPU devices."""

from __future__ import annotations

import os

import jax
import pytest
from flax import nnx

from echorl_jax import config as config_lib, plan, sharding
from echorl_jax.models.transformer import Transformer
from echorl_jax.rl import update
from echorl_jax.trainer import setup
from tests.test_train import ROOT

TINY_CONFIG = os.path.join(ROOT, "configs", "tiny_test.py")


def _device0_bytes(tree) -> int:
    """What device 0 actually holds of a tree of placed arrays."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


@pytest.mark.slow  # compiles every planned phase: slow set (CI runs it)
def test_plan_counts_equal_the_bytes_of_a_real_placed_model_and_optimizer():
    overrides = {"mesh": {"shape": (2, 2, 2)}, "model": {"param_dtype": "bfloat16", "compute_dtype": "bfloat16"}}
    cfg = config_lib.build_config(config_lib.load_config_file(TINY_CONFIG), overrides)
    pl = plan.plan(cfg)
    assert pl.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 2}

    # Independent count: build the real model, place it as the trainer does, sum device 0's buffers.
    mesh = sharding.make_mesh((2, 2, 2))
    model = sharding.shard_model(Transformer(setup.model_config(cfg), rngs=nnx.Rngs(0)), mesh)
    _, params = nnx.split(model)
    opt_state = update.init_opt_state(update.make_optimizer(cfg.optim, 10), params, mesh)  # as trainer/setup.py does
    assert pl.params == _device0_bytes(params)
    assert pl.optimizer == _device0_bytes(opt_state)
    # fp32 moments (mu, nu) of bf16 params, sharded like them: 4x the parameter bytes, plus the step counts.
    assert 4 * pl.params <= pl.optimizer <= 4 * pl.params + 64
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert total / 8 < pl.params < total  # sharded, but norms and small dims stay replicated
    assert pl.train_temp > 0 and pl.sample_temp >= pl.kv_cache > 0
    assert pl.train_peak >= pl.params + pl.optimizer and pl.fits("v5e")


@pytest.mark.slow  # a search: several compiles
def test_plan_command_line_with_fit(capsys):
    code = plan.main(["--config", TINY_CONFIG, "--devices", "8", "--fit", "h100"])
    out = capsys.readouterr().out
    assert code == 0
    assert "parameters" in out and "KV cache" in out and "h200" in out and "train step" in out
    # Nothing binds at this size: no recomputation, the largest packed micro-batch (all 2 rows per device),
    # and a KV budget of 0.1 GB (the least step that holds one row per rollout).
    assert ("recommended for NVIDIA H100 80GB: --config.model.remat=none --config.rl.pack_rows_per_micro_batch=2 "
            "--config.rl.micro_batches=1 --config.sampling.kv_cache_memory=0.1e9 --config.sampling.slots=0 "
            "--config.sampling.decode_tensor_parallel=1") in out


@pytest.mark.slow  # plans and compiles samplers: slow set (CI runs it)
def test_plan_kv_cache_follows_sampling_slots():
    """With slot refill the sampler's cache is slots x (P + T), not N·G x (P + T)."""
    base = {"mesh": {"shape": (8, 1, 1)}}
    cfg = config_lib.build_config(config_lib.load_config_file(TINY_CONFIG), {**base, "sampling": {"slots": 8}})
    pl = plan.plan(cfg)
    mcfg = setup.model_config(cfg)
    p, t = cfg.data.max_prompt_len, cfg.sampling.max_new_tokens
    assert pl.decode_rows == 8 < cfg.rl.prompts_per_step * cfg.rl.group_size
    ring = -(-t // 16) * 16  # T rounded up to the sampler's 16-column key blocks (sampling/decode.py)
    assert pl.kv_per_row == 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.dim_per_head * (p + ring) * 4
    assert pl.kv_cache == pl.kv_per_row * 8 // 8  # 8 rows over 8 devices: one row each
    assert pl.sample_temp >= pl.kv_cache


def _tiny(overrides=None):
    return config_lib.build_config(config_lib.load_config_file(TINY_CONFIG), overrides or {})


@pytest.mark.slow  # compiles the planned train step on an FSDP mesh: slow set (CI runs it)
def test_fsdp_train_step_keeps_rows_sharded():
    """On an FSDP mesh the weights' embed dimension is over the same axis as the rows; left to itself XLA
    replicates the rows inside the scanned layer and all-reduces partial sums (every device computes the
    whole micro-batch). ``sharding.constrain_rows`` under ``traced_on`` keeps each device on its own rows:
    its temporaries stay near the data-parallel mesh's, far below the unconstrained program's."""
    from echorl_jax.planner import context as context_lib
    from echorl_jax.trainer import learn_step

    big = {"model": {"hidden_size": 64, "intermediate_size": 1024, "num_heads": 4, "num_kv_heads": 4},
           "rl": {"prompts_per_step": 8, "group_size": 8}, "sampling": {"max_new_tokens": 120}}  # fmt: skip

    def temp(shape, constrained: bool) -> int:
        cfg = _tiny({**big, "mesh": {"shape": shape}})
        ctx = context_lib.context(cfg)
        sh = jax.tree.map(lambda x: x.sharding, ctx.state)
        fn = update.make_train_step(ctx.graphdef, ctx.optimizer, cfg.objective, cfg.echo, micro_batches=1,
                                    temperature=1.0)  # fmt: skip
        fn = sharding.traced_on(ctx.mesh if constrained else None, fn)
        jitted = jax.jit(fn, in_shardings=(sh, sharding.batch_sharding(ctx.mesh, 2)))
        lowered = jitted.lower(ctx.state, *learn_step.abstract_step_inputs(cfg, ctx.mesh))
        return lowered.compile().memory_analysis().temp_size_in_bytes

    fsdp, fsdp_free, dp = temp((1, 8, 1), True), temp((1, 8, 1), False), temp((8, 1, 1), True)
    assert fsdp < 0.5 * fsdp_free, (fsdp, fsdp_free)
    assert fsdp < 2 * dp, (fsdp, dp)


def test_chunked_logprobs_keep_the_head_once():
    """The output head is a constant of the chunk scan: its backward keeps one head, not one per chunk."""
    import jax.numpy as jnp

    from echorl_jax.models.logprobs import chunked_logp_entropy

    b, t, h, v, chunk = 2, 64, 32, 4096, 8  # 8 chunks; the head is 512 KB, all chunks' heads 4 MB
    hidden = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
    head = jax.ShapeDtypeStruct((h, v), jnp.float32)
    targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
    loss = lambda x, w, y: chunked_logp_entropy(x, w, y, 1.0, chunk)[0].sum()  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, head, targets).compile()
    head_bytes = h * v * 4
    assert grad.memory_analysis().temp_size_in_bytes < 4 * head_bytes


@pytest.mark.slow  # compiles every planned phase: slow set (CI runs it)
def test_every_phase_is_planned():
    """LUFFY with recomputed log-probs, EchoRL's diagnostic and a held-out set: each phase has its own peak,
    the sampler draws G - k rollouts per prompt, and a CPU plan names its attention stand-in."""
    cfg = _tiny({"objective": {"method": "luffy"}, "rl": {"recompute_logp": True}, "echo": {"enabled": True},
                 "train": {"echo_grad_norm_every": 1}})  # fmt: skip
    pl = plan.plan(cfg)
    names = [p.name for p in pl.phases]
    assert names == ["train step", "log-prob pass", "echo diagnostic", "sampler", "held-out sampler"], names
    g, k = cfg.rl.group_size, cfg.objective.expert_per_group
    assert f"{cfg.rl.prompts_per_step} x {g - k} rollouts" in pl.phase("sampler").what
    assert pl.peak == max(p.peak for p in pl.phases) and all(p.program > 0 for p in pl.phases)
    assert pl.phase("sampler").resident >= pl.optimizer  # the optimizer state stays while sampling
    text = plan.format_plan(pl)
    assert "standing in on CPU for auto" in text and "log-prob pass" in text
    # Without those, the plan has only what the run computes.
    assert [p.name for p in plan.plan(_tiny({"data": {"eval": ""}})).phases] == ["train step", "sampler"]


@pytest.mark.slow  # a search: several compiles
def test_fit_chooses_recomputation_only_when_memory_binds(monkeypatch):
    """An accelerator just too small for the learner without remat (but large enough with full remat): the
    search keeps the first policy that fits, from none to full, and the plan under its setting fits."""
    from echorl_jax.planner import context as context_lib, fit as fit_lib, memory

    cfg = _tiny({"model": {"hidden_size": 64, "intermediate_size": 512}, "sampling": {"max_new_tokens": 120}})
    peaks = {}
    for r in ("none", "full"):
        c = fit_lib._with(cfg, model={"remat": r}, rl={"pack_rows_per_micro_batch": 1})
        peaks[r] = max(p.peak for p in memory.learner_memory(c, context_lib.context(c)).phases)
    assert peaks["full"] < peaks["none"]
    cap = (peaks["full"] + peaks["none"]) / 2 / memory.USABLE
    monkeypatch.setitem(memory.ACCELERATORS, "tiny", ("a tiny chip", cap))
    found = fit_lib.fit(cfg, "tiny", log=lambda _: None)
    assert found.plan is not None and found.plan.fits("tiny"), found.why
    assert found.overrides["model.remat"] != "none"
    assert found.overrides["rl.pack_rows_per_micro_batch"] >= 1
