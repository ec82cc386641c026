"""Qwen3-8B-Base (Qwen/Qwen3-8B-Base) x Dr.GRPO at the paper's hyperparameters (configs/paper/_base.py).

Accelerator: 32 devices of >= 80 GB: 4 nodes of 8 H100 80GB, or TPU v5p-64 (32 chips);
mesh (1, -1, 1) (FSDP), rl.micro_batches=16;
estimated peak 44 GiB per device (_base.per_device_gib).
Run:    python -m echorl_jax.main --config configs/paper/qwen3_8b_base_drgrpo.py
EchoRL: add --config.echo.enabled=true
"""

import os
import runpy

_base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_base.py"))


def get_config():
    return _base["paper_config"]("qwen3_8b_base", "drgrpo")
