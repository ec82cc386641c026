"""The built-in default: warm start + GRPO+EchoRL on the arithmetic task, on CPU.

`python -m echorl_jax.main` runs this. Everything not listed keeps the schema
default in echorl_jax/config.py. The RL learning rate and length come from the
sweep in RESULTS.md: at 1e-4 and above RL degrades this model; 3e-5 gains about
3-4 points of held-out avg@4 by 200-500 steps (256 held-out prompts, standard
error about 2 points per evaluation).
"""


def get_config():
    return {
        "model": {"model_type": "llama", "attention_bias": False, "tie_embeddings": True, "vocab_size": 128, "hidden_size": 128, "intermediate_size": 344,
                  "num_layers": 4, "num_heads": 4, "num_kv_heads": 2},
        "task": {"min_steps": 1, "max_steps": 4},
        "data": {"train": "task:arith", "max_prompt_len": 16, "num_eval_per_level": 64},
        "sampling": {"temperature": 1.0, "max_new_tokens": 48},
        "objective": {"method": "grpo"},
        "echo": {"enabled": True, "coef": 0.001},
        "rl": {"prompts_per_step": 16, "group_size": 8},
        "optim": {"learning_rate": 3e-5, "warmup_steps": 5},
        "sft": {"steps": 400, "batch_size": 64, "learning_rate": 2e-3},
        "train": {"steps": 300, "workdir": "runs/default", "eval_every": 50, "eval_samples": 4,
                  "echo_grad_norm_every": 10},
    }
