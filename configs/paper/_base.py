"""Shared body of the paper recipes (configs/paper/<model>_<method>.py load it with runpy).

The paper's setting (EchoRL, after LUFFY): OpenR1-Math-46k prompts (with DeepSeek-R1 expert traces for
LUFFY), 128 prompts x 8 rollouts per step, lr 1e-6 constant, responses up to 8192 tokens, temperature 1.0
for training and 0.6 for evaluation, no KL term. Values the paper does not give follow LUFFY's public
script (exp_scripts/train.sh): prompts up to 1024 tokens, two optimizer steps per RL step (mini-batch of
64 prompts), AdamW weight decay 0.01, gradient clipping 1.0.

EchoRL is off in every file (the baseline row of the paper's table); ``--config.echo.enabled=true``
turns it on (lambda = 0.001). (``objective.method=METHOD+echo`` would contradict the file's
``echo.enabled=False`` and is refused.)

Data: the parquet files ``python -m echorl_jax.data_prep`` writes under ``$ECHORL_DATA``
(default ``data``: ``data/openr1_math_46k.parquet``, ``data/eval/<benchmark>.parquet``); override with ``--config.data.train=...`` / ``--config.data.eval=...``.

Memory: ``per_device_gib`` is the estimate behind each recipe's accelerator line (docs/recipes.md). It
counts fp32 parameters + gradients + AdamW moments (16 B/param) sharded over all devices (mesh (1, -1, 1):
FSDP over every device), the bf16 KV cache of the sampling batch (rows sharded over devices), and one
micro-batch's training activations: bf16 layer inputs kept by full remat plus the fp32 logits of the
response positions. XLA's temporaries and the per-layer working set are not included: keep ~25% headroom
and check the compiled step's memory on the first run.
"""

import os

DATA = os.environ.get("ECHORL_DATA", "data")  # where data_prep writes

# Hub id, architecture numbers for the memory estimate, and the accelerator plan per model.
MODELS = {
    "qwen25_math_7b": dict(
        accelerator="16 devices of >= 80 GB: 2 nodes of 8 H100 80GB, or TPU v5p-32 (16 chips)",
        path="Qwen/Qwen2.5-Math-7B", family="qwen2", params=7.62e9, layers=28, hidden=3584, kv_heads=4,
        head_dim=128, vocab=152064, devices=16, micro_batches=32,
        # config.json says 4096 positions; LUFFY (and the paper) extend the context as here.
        context={"rope_theta_override": 40000.0, "max_position_override": 16384},
    ),
    "qwen25_math_1p5b": dict(
        accelerator="8 devices of >= 80 GB: 1 node of 8 H100 80GB, or TPU v5p-16 (8 chips)",
        path="Qwen/Qwen2.5-Math-1.5B", family="qwen2", params=1.54e9, layers=28, hidden=1536, kv_heads=2,
        head_dim=128, vocab=151936, devices=8, micro_batches=32,
        context={"rope_theta_override": 40000.0, "max_position_override": 16384},
    ),
    "llama31_8b_instruct": dict(
        accelerator="32 devices of >= 80 GB: 4 nodes of 8 H100 80GB, or TPU v5p-64 (32 chips)",
        path="meta-llama/Llama-3.1-8B-Instruct", family="llama", params=8.03e9, layers=32, hidden=4096, kv_heads=8,
        head_dim=128, vocab=128256, devices=32, micro_batches=16, context={},
    ),
    "qwen3_8b_base": dict(
        accelerator="32 devices of >= 80 GB: 4 nodes of 8 H100 80GB, or TPU v5p-64 (32 chips)",
        path="Qwen/Qwen3-8B-Base", family="qwen3", params=8.19e9, layers=36, hidden=4096, kv_heads=8,
        head_dim=128, vocab=151936, devices=32, micro_batches=16, context={},
    ),
}
METHODS = ("grpo", "drgrpo", "dapo", "luffy")

PROMPTS, GROUP, PROMPT_LEN, RESPONSE_LEN, MINIBATCHES = 128, 8, 1024, 8192, 2


def per_device_gib(m: dict, devices: int, micro_batches: int) -> dict[str, float]:
    """Estimated GiB per device for model ``m`` (a MODELS entry) at the paper's batch; see the docstring."""
    gib = 2.0**30
    rows, span = PROMPTS * GROUP, PROMPT_LEN + RESPONSE_LEN
    state = 16 * m["params"] / devices
    kv = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * 2 * span * rows / devices  # k and v, bf16
    rows_mb = rows / (MINIBATCHES * micro_batches * devices)  # rows per device per micro-batch
    act = rows_mb * (span * m["hidden"] * m["layers"] * 2 + RESPONSE_LEN * m["vocab"] * 4)
    out = {"state": state / gib, "kv_cache": kv / gib, "activations": act / gib}
    # Sampling and the update do not overlap: the peak is the state plus the larger of the two.
    out["peak"] = out["state"] + max(out["kv_cache"], out["activations"])
    return out


def paper_config(model: str, method: str) -> dict:
    m = MODELS[model]
    if method not in METHODS:
        raise ValueError(f"paper recipes cover {METHODS}, not {method!r}")
    return {
        "model": {"path": m["path"], "param_dtype": "float32", "compute_dtype": "bfloat16", "remat": "full",
                  **m["context"]},
        "mesh": {"shape": (1, -1, 1)},  # FSDP over every device
        # Prompts are chat messages (data_prep): rendered with the tokenizer's chat template.
        "data": {"train": f"{DATA}/openr1_math_46k.parquet", "eval": f"{DATA}/eval/math500.parquet",
                 "max_prompt_len": PROMPT_LEN, "on_overlong": "drop"},
        "sampling": {"temperature": 1.0, "max_new_tokens": RESPONSE_LEN},
        "reward": {"name": "math"},
        "objective": {"method": method},
        "echo": {"enabled": False, "coef": 0.001},
        "rl": {"prompts_per_step": PROMPTS, "group_size": GROUP, "minibatches": MINIBATCHES,
               "micro_batches": m["micro_batches"]},
        "optim": {"learning_rate": 1e-6, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.01,
                  "max_grad_norm": 1.0},
        "train": {"steps": 500, "workdir": f"runs/paper/{model}_{method}", "eval_every": 50, "eval_samples": 1,
                  "eval_temperature": 0.6, "save_every": 50, "echo_grad_norm_every": 50},
    }
