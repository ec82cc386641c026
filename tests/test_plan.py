"""The memory planner (plan.py) on the tiny config over 8 fake CPU devices."""

from __future__ import annotations

import os

import jax
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


def test_plan_command_line_with_fit(capsys):
    code = plan.main(["--config", TINY_CONFIG, "--devices", "8", "--fit", "h100", "--config.rl.micro_batches=1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "parameters" in out and "KV cache" in out and "h200" in out
    assert "recommended for NVIDIA H100 80GB: --config.rl.micro_batches=1" in out


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
