"""Qwen2.5-Math-1.5B (Qwen/Qwen2.5-Math-1.5B) x Dr.GRPO at the paper's hyperparameters (configs/paper/_base.py).

Accelerator: 8 devices of >= 80 GB: 1 node of 8 H100 80GB, or TPU v5p-16 (8 chips);
mesh (1, -1, 1) (FSDP), rl.micro_batches=32;
estimated peak 34 GiB per device (_base.per_device_gib).
Run:    python -m echorl_jax.main --config configs/paper/qwen25_math_1p5b_drgrpo.py
EchoRL: add --config.echo.enabled=true
"""

import os
import runpy

_base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_base.py"))


def get_config():
    return _base["paper_config"]("qwen25_math_1p5b", "drgrpo")
