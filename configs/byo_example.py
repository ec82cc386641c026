"""Bring your own model and dataset: a local Hugging Face checkpoint with a chat
template, verl-style parquet files and a custom reward next to math-verify.

Edit the paths, then: python -m echorl_jax.main --config configs/byo_example.py
(runs land in runs/byo_example; tests/test_byo.py runs this file on a tiny model).
"""


def get_config():
    return {
        # config.json + *.safetensors + tokenizer files; the architecture is read from config.json.
        # fp32 master weights and Adam moments, bf16 compute (docs/training.md, Memory).
        "model": {"path": "/path/to/Qwen2.5-0.5B-Instruct", "param_dtype": "float32", "compute_dtype": "bfloat16",
                  "remat": "full"},
        # verl parquet: prompt (chat messages or text), reward_model.ground_truth, data_source[, extra_info].
        # "auto" applies the tokenizer's chat template to message prompts; a tuple of files is a mixture.
        "data": {"train": ("/path/to/math_train.parquet", "/path/to/my_task_train.parquet"),
                 "eval": "/path/to/math_test.parquet", "max_prompt_len": 512},
        # Responses stop at the tokenizer's eos, generation_config.json's eos ids and the chat template's
        # end-of-turn token (logged at start-up).
        "sampling": {"max_new_tokens": 1024, "temperature": 1.0},
        # math-verify on \boxed{} / "answer is" answers; rows whose data_source matches my_task_* go to
        # score(response, ground_truth, *, data_source, extra_info, prompt) in my_rewards.py.
        "reward": {"name": "math", "by_source": ("my_task_*=custom",), "custom": "/path/to/my_rewards.py:score"},
        "objective": {"method": "grpo"},
        "echo": {"enabled": True, "coef": 0.001},
        "rl": {"prompts_per_step": 32, "group_size": 8, "micro_batches": 8},
        "optim": {"learning_rate": 1e-6, "warmup_steps": 10},
        "train": {"steps": 500, "eval_every": 50, "save_every": 50, "eval_samples": 4},
    }
