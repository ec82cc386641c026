"""Qwen3-8B-Base (Qwen/Qwen3-8B-Base) x LUFFY at the paper's hyperparameters (configs/paper/_base.py).

Setting: LUFFY (LUFFY's script): no PPO clip on on-policy tokens, recomputed old log-probs, its loss scale and
entropy weighting.

Accelerator: 8 × 80 GB (one node of 8 H100 or A100 80GB); mesh (1, -1, 1) (FSDP); planned with EchoRL on by
python -m echorl_jax.plan --config configs/paper/qwen3_8b_base_grpo.py --devices 8 --config.model.path=configs/paper/models/qwen3_8b_base --config.echo.enabled=true --fit h100
(configs/paper/plans.json): model.remat=attn, rl.pack_rows_per_micro_batch=2,
sampling.kv_cache_memory=30.1e9, sampling.decode_tensor_parallel=2; peak 71.8 GB per device (sampler).
Run:    python -m echorl_jax.main --config configs/paper/qwen3_8b_base_luffy.py
EchoRL: add --config.echo.enabled=true
"""

import os
import runpy

_base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_base.py"))


def get_config():
    return _base["paper_config"]("qwen3_8b_base", "luffy")
