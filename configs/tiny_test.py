"""A seconds-long run for tests and CI: the default's code path at toy sizes."""


def get_config():
    return {
        "model": {"model_type": "llama", "attention_bias": False, "tie_embeddings": True, "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                  "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
        "task": {"min_steps": 1, "max_steps": 2},
        "data": {"max_prompt_len": 8, "num_train": 256, "num_eval_per_level": 4},
        "sampling": {"max_new_tokens": 28},
        "rl": {"prompts_per_step": 4, "group_size": 4},
        "optim": {"learning_rate": 1e-3},
        "sft": {"steps": 20, "batch_size": 16, "learning_rate": 3e-3},
        "train": {"steps": 2, "workdir": "runs/tiny_test", "eval_every": 0, "eval_samples": 2, "progress": False},
    }
