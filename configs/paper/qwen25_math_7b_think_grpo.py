"""LUFFY's own setting: Elliott/Qwen2.5-Math-7B-16k-think on LUFFY's R1-style prompts, think reward x GRPO at the paper's hyperparameters (configs/paper/_base.py).

Accelerator: 16 devices of >= 80 GB: 2 nodes of 8 H100 80GB, or TPU v5p-32 (16 chips);
mesh (1, -1, 1) (FSDP), rl.micro_batches=32;
estimated peak 39 GiB per device (_base.per_device_gib).
Data:   python -m echorl_jax.data_prep openr1_math_46k --prompt-style source
        python -m echorl_jax.data_prep math500 --prompt-style r1
Run:    python -m echorl_jax.main --config configs/paper/qwen25_math_7b_think_grpo.py
EchoRL: add --config.echo.enabled=true
"""

import os
import runpy

_base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_base.py"))


def get_config():
    return _base["paper_config"]("qwen25_math_7b_think", "grpo")
