"""Qwen2.5-Math-7B (Qwen/Qwen2.5-Math-7B) x DAPO at the paper's hyperparameters (configs/paper/_base.py).

Setting: DAPO (DAPO paper): the dapo preset.

Accelerator: 8 × 80 GB (one node of 8 H100 or A100 80GB); mesh (1, -1, 1) (FSDP); planned with EchoRL on by
python -m echorl_jax.plan --config configs/paper/qwen25_math_7b_grpo.py --devices 8 --config.model.path=configs/paper/models/qwen25_math_7b --config.echo.enabled=true --fit h100
(configs/paper/plans.json): model.remat=attn, rl.pack_rows_per_micro_batch=2,
sampling.kv_cache_memory=34.1e9, sampling.decode_tensor_parallel=2; peak 71.9 GB per device (sampler).
Run:    python -m echorl_jax.main --config configs/paper/qwen25_math_7b_dapo.py
EchoRL: add --config.echo.enabled=true
"""

import os
import runpy

_base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_base.py"))


def get_config():
    return _base["paper_config"]("qwen25_math_7b", "dapo")
