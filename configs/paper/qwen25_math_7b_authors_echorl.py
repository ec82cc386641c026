"""The EchoRL authors' own run, setting for setting: Qwen/Qwen2.5-Math-7B x GRPO + EchoRL as
bibisbar/EchoRL exp_scripts/baseline_train_pure_grpo_entropy_sft.sh sets it (configs/paper/_base.py; docs/recipes.md
lists every line of the script with the key that reproduces it).

Setting: GRPO (EchoRL authors' script) + EchoRL: mean-only group advantage, LUFFY's loss scale (a token sum /
8,192 per micro-batch), entropy bonus 0.001, PPO clip, recomputed old log-probs; EchoClip lambda 0.001 at
success = reward 1.0, steps split at ids 198 and 271 (newline, double newline); the dataset's own prompts,
think reward; validation before training and every 5 steps.

Accelerator: 8 × 80 GB (one node of 8 H100 or A100 80GB); mesh (1, -1, 1) (FSDP); planned with EchoRL on by
python -m echorl_jax.plan --config configs/paper/qwen25_math_7b_grpo.py --devices 8 --config.model.path=configs/paper/models/qwen25_math_7b --config.echo.enabled=true --fit h100
(configs/paper/plans.json): model.remat=attn, rl.pack_rows_per_micro_batch=2,
sampling.kv_cache_memory=34.1e9, sampling.decode_tensor_parallel=2; peak 71.9 GB per device (sampler).
Run:    python -m echorl_jax.main --config configs/paper/qwen25_math_7b_authors_echorl.py
GRPO:   the same without EchoRL is qwen25_math_7b_authors_grpo.py (baseline_train_pure_grpo.sh)
"""

import os
import runpy

_base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_base.py"))


def get_config():
    return _base["paper_config"]("qwen25_math_7b_authors", "echorl")
