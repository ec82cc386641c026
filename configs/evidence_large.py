"""EchoRL's regime at a larger size, for one GPU: configs/evidence.py with a ~23M-parameter model.

Same task and protocol as configs/evidence.py (1-3 operations, a long warm start so most groups
are all-correct, the echo term's gradient share logged), scaled for an accelerator: an 8-layer,
512-wide model, 64 prompts x 8 rollouts per step, 300 RL steps. Eight runs fit one GPU at once:

    python -m echorl_jax.main --config configs/evidence_large.py --compare --seeds 0,1,2 --parallel 8

Not yet run on a GPU (no session so far had one; RESULTS.md "EchoRL's regime"); the CPU builds it
and runs it shrunk in tests/test_configs.py. The warm-start settings are a starting point, not tuned.
"""


def get_config():
    return {
        "model": {"model_type": "llama", "attention_bias": False, "tie_embeddings": True, "vocab_size": 128,
                  "hidden_size": 512, "intermediate_size": 1376, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4},
        "task": {"min_steps": 1, "max_steps": 3},
        "data": {"train": "task:arith", "max_prompt_len": 16, "num_train": 65536, "num_eval_per_level": 256},
        "sampling": {"temperature": 1.0, "max_new_tokens": 40},
        "objective": {"method": "grpo"},
        "echo": {"enabled": True, "coef": 0.001},
        "rl": {"prompts_per_step": 64, "group_size": 8},
        "optim": {"learning_rate": 1e-5, "warmup_steps": 10},
        "sft": {"steps": 2000, "batch_size": 128, "learning_rate": 5e-4, "warmup_steps": 100},
        "train": {"steps": 300, "eval_every": 50, "eval_samples": 4, "echo_grad_norm_every": 10},
    }
