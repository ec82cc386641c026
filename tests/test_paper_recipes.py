"""configs/paper/: every recipe builds and validates at full size with the paper's hyperparameters, and one
recipe per model family x method runs one RL step shrunk to a tiny random model of that family."""

from __future__ import annotations

import glob
import os
import runpy

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from byo_fixture import VOCAB_SIZE, make_bpe_tokenizer

from echorl_jax import config as config_lib
from echorl_jax.trainer import train
from echorl_jax.trainer.metrics_log import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "configs", "paper")
BASE = runpy.run_path(os.path.join(PAPER, "_base.py"))
RECIPES = sorted(p for p in glob.glob(os.path.join(PAPER, "*.py")) if not os.path.basename(p).startswith("_"))
FAMILY_OF = {name: m["family"] for name, m in BASE["MODELS"].items()}
HUB_ID = {name: m["path"] for name, m in BASE["MODELS"].items()}


def recipe_name(path: str) -> tuple[str, str]:
    model, _, method = os.path.basename(path)[: -len(".py")].rpartition("_")
    return model, method


def test_one_recipe_per_model_and_method():
    assert [recipe_name(p) for p in RECIPES] == sorted(
        (model, method) for model in BASE["MODELS"] for method in ("grpo", "drgrpo", "dapo", "luffy")
    )


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.basename(p))
def test_recipe_builds_with_the_papers_hyperparameters(path):
    model, method = recipe_name(path)
    values = config_lib.load_config_file(path)
    for echo in (False, True):
        cfg = config_lib.build_config(values, {"echo": {"enabled": echo}})
        assert cfg.echo.enabled == echo and cfg.echo.coef == 0.001
        assert cfg.objective.method == method and cfg.model.path == HUB_ID[model]
        assert (cfg.rl.prompts_per_step, cfg.rl.group_size) == (128, 8)
        assert (cfg.optim.learning_rate, cfg.sampling.max_new_tokens) == (1e-6, 8192)
        assert (cfg.sampling.temperature, cfg.train.eval_temperature) == (1.0, 0.6)
        assert cfg.objective.kl_coef == 0.0
        assert cfg.objective.expert_per_group == (1 if method == "luffy" else 0)
    # The accelerator plan the file states and applies: the planner's (configs/paper/plans.json, written by
    # bench/plan_recipes.py), every phase within 90 % of the accelerator's memory.
    plan = BASE["PLANS"][BASE["PLAN_OF"].get(model, model)]
    d, rows = plan["devices"], 128 * 8
    assert rows % d == 0 and 128 * (8 - cfg.objective.expert_per_group) % d == 0  # whole rows per device
    for key, value in plan["overrides"].items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == value, key
    cap = {"h100": 80, "v5e": 16, "v5p": 95}[plan["accelerator"]]
    for method_plan in (plan["grpo"], plan["luffy"]):
        assert max(method_plan["phases"].values()) <= 0.9 * cap, method_plan
    assert f"peak {plan['grpo']['peak_gb']:.1f} GB per device" in open(path).read()
    # A prompt + response fits the model's positions (LUFFY's context extension for Qwen2.5-Math).
    if "qwen25_math" in model:
        assert cfg.model.max_position_override >= 1024 + 8192


TINY = {  # a tiny random model of each family, as dotted overrides
    "qwen2": {"model_type": "qwen2", "attention_bias": True, "qk_norm": False},
    "llama": {"model_type": "llama", "attention_bias": False, "qk_norm": False, "rope_type": "llama3",
              "rope_original_max_position": 64},
    "qwen3": {"model_type": "qwen3", "attention_bias": False, "qk_norm": True, "head_dim": 16},
}


def write_train_parquet(path, n=8):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "reward_model": {"ground_truth": str(2 * i), "style": "rule"}, "data_source": "openr1",
             "expert": f"{2 * i}\n\\boxed{{{2 * i}}}"} for i in range(n)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)


def shrunk(path, tmp_path, echo: bool) -> config_lib.Config:
    model, method = recipe_name(path)
    tok_dir = tmp_path / "tok"
    if not tok_dir.exists():
        make_bpe_tokenizer().save_pretrained(tok_dir)
        write_train_parquet(tmp_path / "train.parquet")
    tiny = {"path": "", "vocab_size": VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
            "num_heads": 4, "num_kv_heads": 2, "tie_embeddings": True, "param_dtype": "float32",
            "compute_dtype": "float32", **TINY[FAMILY_OF[model]]}  # fmt: skip
    overrides = {
        "model": tiny,
        "data": {"train": str(tmp_path / "train.parquet"), "eval": "", "tokenizer": str(tok_dir), "max_prompt_len": 32},
        "sampling": {"max_new_tokens": 24},
        "echo": {"enabled": echo},
        "rl": {"prompts_per_step": 4, "group_size": 4, "pack_rows_per_micro_batch": 1, "max_sample_rounds": 1},
        "train": {"steps": 1, "workdir": str(tmp_path / f"{model}_{method}"), "export_hf": False, "resume": False,
                  "eval_every": 0, "save_every": 0, "progress": False, "echo_grad_norm_every": 1},
    }  # fmt: skip
    return config_lib.build_config(config_lib.load_config_file(path), overrides)


# The paper's model (qwen2 family) runs every method; llama and qwen3 run one sampler layout each way
# (grpo, and luffy with its expert rows). The two Qwen2.5-Math sizes differ only in numbers the shrink
# replaces, so the 1.5B files are covered by the build test above. Measured: ~4 min for all three on 2
# shared CPU cores; one-step runs reuse the family's setup (and compiled sampler) across methods.
RUN_METHODS = {"qwen25_math_7b": ("dapo", "drgrpo", "grpo", "luffy"), "llama31_8b_instruct": ("grpo", "luffy"),
               "qwen3_8b_base": ("grpo", "luffy")}
RUN = [p for p in RECIPES if recipe_name(p)[1] in RUN_METHODS.get(recipe_name(p)[0], ())]


@pytest.mark.parametrize("family", [pytest.param("qwen2", marks=pytest.mark.slow), pytest.param("llama", marks=pytest.mark.slow),
                                    pytest.param("qwen3", marks=pytest.mark.slow)])
def test_recipes_run_one_rl_step_shrunk_to_a_tiny_model(tmp_path, family):
    setups = {}  # by expert rows per group: the sampler (and its compiled program) is shared across methods
    for i, path in enumerate(p for p in RUN if FAMILY_OF[recipe_name(p)[0]] == family):
        model, method = recipe_name(path)
        cfg = shrunk(path, tmp_path, echo=i % 2 == 1)  # EchoRL on every other method
        assert cfg.model.model_type == family
        k = cfg.objective.expert_per_group
        setup = setups.get(k)
        out = train.train(cfg, setup=setup)
        setups[k] = out["setup"]
        rows = [r for r in read_jsonl(os.path.join(cfg.train.workdir, "metrics.jsonl")) if r["kind"] == "train"]
        assert [r["step"] for r in rows] == [1], path
        assert np.isfinite(rows[0]["loss"]) and np.isfinite(rows[0]["grad_norm"]), (path, rows[0])
        if method == "luffy":
            assert rows[0]["expert/accuracy"] == 1.0, rows[0]


def test_recipes_doc_table_is_the_planners():
    """docs/recipes.md's hardware table is generated from configs/paper/plans.json (bench/plan_recipes.py)."""
    gen = runpy.run_path(os.path.join(ROOT, "bench", "plan_recipes.py"))
    doc = open(os.path.join(ROOT, "docs", "recipes.md")).read()
    assert gen["table"](BASE["PLANS"]) in doc
    assert set(BASE["PLANS"]) >= set(gen["TARGETS"]) and all(m in BASE["PLANS"] for m in BASE["MODELS"]
                                                             if m not in BASE["PLAN_OF"])  # fmt: skip
