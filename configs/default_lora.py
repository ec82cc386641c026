"""The default job (configs/default.py) with LoRA: the same warm start, task, method and budget
(300 RL steps of 16 prompts x 8 rollouts), but only rank-8 adapters on every projection are trained
(docs/lora.md). The warm start trains every weight before the adapters are attached, so this run
starts from the same policy as the full fine-tune. The learning rate is LoRA's own (RESULTS.md, "LoRA").

    python -m echorl_jax.main --config configs/default_lora.py
"""

import os
import runpy

_default = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config():
    cfg = _default["get_config"]()
    cfg["model"] = {**cfg["model"], "lora": {"rank": 8, "alpha": 16.0}}
    cfg["optim"] = {**cfg["optim"], "learning_rate": 3e-4}
    cfg["train"] = {**cfg["train"], "workdir": "runs/default_lora"}
    return cfg
