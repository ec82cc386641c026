"""EchoRL's regime: a warm start strong enough that most groups are all-correct, so GRPO's
advantages vanish for most prompts and the echo term is their only signal.

Compared with configs/default.py: easier problems (1-3 operations), a longer warm start, and
the echo term's gradient norm logged every 10 steps (its share of the update). Run the
comparison (GRPO / DAPO, each with and without EchoRL, several seeds, one shared warm start):

    python -m echorl_jax.main --config configs/evidence.py --compare --seeds 0,1,2
    python -m echorl_jax.main --config configs/evidence.py --compare --seeds 0,1,2 --config.echo.coef=0.01

Results and the machine they came from: RESULTS.md ("EchoRL's regime").
"""


def get_config():
    return {
        "model": {"model_type": "llama", "attention_bias": False, "tie_embeddings": True, "vocab_size": 128,
                  "hidden_size": 128, "intermediate_size": 344, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2},
        "task": {"min_steps": 1, "max_steps": 3},
        "data": {"train": "task:arith", "max_prompt_len": 16, "num_eval_per_level": 128},
        "sampling": {"temperature": 1.0, "max_new_tokens": 40},
        "objective": {"method": "grpo"},
        "echo": {"enabled": True, "coef": 0.001},
        "rl": {"prompts_per_step": 16, "group_size": 8},
        "optim": {"learning_rate": 3e-5},
        "sft": {"steps": 600, "batch_size": 64, "learning_rate": 2e-3},
        "train": {"steps": 100, "eval_every": 25, "eval_samples": 4, "echo_grad_norm_every": 10},
    }
