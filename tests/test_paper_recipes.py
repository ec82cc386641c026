"""configs/paper/: every recipe builds and validates at full size with the paper's hyperparameters, and one
recipe per model family x method runs one RL step shrunk to a tiny random model of that family."""

from __future__ import annotations

import glob
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from byo_fixture import VOCAB_SIZE, make_bpe_tokenizer

from echorl_jax import config as config_lib
from echorl_jax.evaluation import paper_table
from echorl_jax.trainer import train
from echorl_jax.trainer.metrics_log import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "configs", "paper")
BASE = runpy.run_path(os.path.join(PAPER, "_base.py"))
RECIPES = sorted(p for p in glob.glob(os.path.join(PAPER, "*.py")) if not os.path.basename(p).startswith("_"))
PLANNER = runpy.run_path(os.path.join(ROOT, "bench", "plan_recipes.py"))
FAMILY_OF = {name: m["family"] for name, m in BASE["MODELS"].items()}
HUB_ID = {name: m["path"] for name, m in BASE["MODELS"].items()}


def recipe_name(path: str) -> tuple[str, str]:
    model, _, method = os.path.basename(path)[: -len(".py")].rpartition("_")
    return model, method


def test_one_recipe_per_model_and_method():
    assert sorted(recipe_name(p) for p in RECIPES) == sorted(
        (model, method) for model in BASE["MODELS"] for method in BASE["methods_of"](model)
    )
    assert BASE["methods_of"]("qwen25_math_7b_authors") == ("grpo", "echorl")  # the authors' two scripts


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.basename(p))
def test_recipe_builds_with_the_papers_hyperparameters(path):
    model, method = recipe_name(path)
    values = config_lib.load_config_file(path)
    cfg = config_lib.build_config(values)
    assert cfg.echo.enabled == (method == "echorl")  # EchoRL off but in the authors' EchoRL run
    # The docstring says whose setting the recipe follows, as evaluate labels its runs.
    assert f"\nSetting: {paper_table.run_label(cfg)}: " in open(path).read(), paper_table.run_label(cfg)
    if method in ("grpo", "echorl"):  # the EchoRL authors' GRPO (configs/paper/_base.py says why)
        assert paper_table.run_label(cfg).startswith("GRPO (EchoRL authors' script)")
        obj = cfg.objective
        assert (obj.estimator, obj.policy_loss, obj.aggregation) == ("drgrpo", "ppo", "seq-mean-token-sum-norm")
        assert (obj.norm_length, obj.entropy_coef, obj.clip_low, obj.clip_high) == (128, 0.001, 0.2, 0.2)
        assert cfg.rl.recompute_logp
    # Steps split as the paper's code splits them: Qwen2.5's ids 198, 271; as texts for the other tokenizers.
    assert cfg.echo.delimiter_ids == ((198, 271) if "authors" in model else ("\n", "\n\n"))
    for echo in (False, True):
        cfg = config_lib.build_config(values, {"echo": {"enabled": echo}})
        assert cfg.echo.enabled == echo and cfg.echo.coef == 0.001
        assert cfg.objective.method == ("grpo" if method == "echorl" else method) and cfg.model.path == HUB_ID[model]
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
    for method_plan in (plan["grpo"], plan["luffy"], *plan.get("recipes", {}).values()):
        assert max(method_plan["phases"].values()) <= 0.9 * cap, method_plan
    own = PLANNER["own_plan"](BASE["PLANS"], os.path.basename(path)[: -len(".py")])  # its recipe's, else grpo's
    assert f"peak {own['peak_gb']:.1f} GB per device" in open(path).read()
    # A prompt + response fits the model's positions (LUFFY's context extension for Qwen2.5-Math).
    if "qwen25_math" in model:
        assert cfg.model.max_position_override >= 1024 + 8192


def test_authors_echorl_recipe_prints_the_scripts_settings():
    """--print-config of the EchoRL authors' run (with Qwen2.5-Math-7B's config.json) shows every setting of
    bibisbar/EchoRL exp_scripts/baseline_train_pure_grpo_entropy_sft.sh as the script sets it (docs/recipes.md
    has the table with file:line)."""
    out = subprocess.run([sys.executable, "-m", "echorl_jax.main", "--config", "configs/paper/qwen25_math_7b_authors_echorl.py",
                          "--config.model.path=configs/paper/models/qwen25_math_7b", "--print-config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    c = json.loads(out.stdout)
    o, e, t, rl = c["objective"], c["echo"], c["train"], c["rl"]
    assert o["method"] == "grpo" and o["estimator"] == "drgrpo"  # :51 adv_estimator=grpo, :107 grpo_use_std=False
    assert o["aggregation"] == "seq-mean-token-sum-norm" and o["norm_length"] == 128  # :108 loss_remove_token_mean
    assert (o["entropy_coef"], o["entropy_norm_tokens"]) == (0.001, 406)  # :82 entropy_coeff=0.001
    assert (o["policy_loss"], o["clip_low"], o["clip_high"]) == ("ppo", 0.2, 0.2)  # PPO clip kept (clip_ratio 0.2)
    assert o["kl_coef"] == 0.0 and o["expert_per_group"] == 0  # :65,:81,:95 no KL; :100-101 no expert prefix
    assert e == {**e, "enabled": True, "coef": 0.001, "success_threshold": 1.0, "delimiter_ids": [198, 271],
                 "eligible": "all_success", "top_k": 1}  # :114-118  # fmt: skip
    assert (t["eval_every"], t["eval_samples"], t["eval_temperature"]) == (5, 1, 0.6)  # :92, :78, :75 (+ step 0: :88)
    assert (t["save_every"], t["keep_checkpoints"]) == (5, 2)  # :91, :110
    assert (rl["prompts_per_step"], rl["group_size"], rl["minibatches"], rl["epochs"]) == (128, 8, 2, 1)  # :54,:77,:61
    assert rl["recompute_logp"]  # mix_trainer.py:533-536
    assert c["optim"]["learning_rate"] == 1e-6 and c["optim"]["max_grad_norm"] == 1.0  # :59; grad_clip 1.0
    assert c["sampling"]["temperature"] == 1.0 and c["sampling"]["max_new_tokens"] == 8192  # :74, :57
    assert c["data"]["max_prompt_len"] == 1024 and c["data"]["train"].endswith("openr1_math_46k_source.parquet")
    assert c["reward"]["think"] and not c["reward"]["strict"]  # :109 reward_impl_version=3
    assert c["model"]["model_type"] == "qwen2" and c["model"]["hidden_size"] == 3584  # Qwen2.5-Math-7B


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


# The paper's model (qwen2 family) runs every method and the EchoRL authors' run; llama and qwen3 run one
# sampler layout each way (grpo, and luffy with its expert rows). The two Qwen2.5-Math sizes differ only in
# numbers the shrink replaces, so the 1.5B files are covered by the build test above. Measured: ~3 min for all
# three on 2 shared CPU cores; one-step runs reuse a setup (and compiled sampler) where the configs agree on
# what a setup fixes (the GRPO recipes recompute log-probs, the authors' run has its own data and reward).
RUN_METHODS = {"qwen25_math_7b": ("dapo", "drgrpo", "grpo", "luffy"), "qwen25_math_7b_authors": ("echorl",),
               "llama31_8b_instruct": ("grpo", "luffy"), "qwen3_8b_base": ("grpo", "luffy")}
RUN = [p for p in RECIPES if recipe_name(p)[1] in RUN_METHODS.get(recipe_name(p)[0], ())]


@pytest.mark.parametrize("family", [pytest.param("qwen2", marks=pytest.mark.slow), pytest.param("llama", marks=pytest.mark.slow),
                                    pytest.param("qwen3", marks=pytest.mark.slow)])
def test_recipes_run_one_rl_step_shrunk_to_a_tiny_model(tmp_path, family):
    setups = {}  # by what a setup fixes: the sampler (and its compiled program) is shared across methods
    for i, path in enumerate(p for p in RUN if FAMILY_OF[recipe_name(p)[0]] == family):
        model, method = recipe_name(path)
        cfg = shrunk(path, tmp_path, echo=i % 2 == 1)  # EchoRL on every other method
        assert cfg.model.model_type == family
        steps = 1
        if method == "echorl":  # the authors' run (its own setup anyway) streams: k = 1, two steps (issue 30)
            steps = 2
            cfg = config_lib.build_config(config_lib.to_dict(cfg), {
                "rl": {"max_staleness": 1, "recompute_logp": True}, "objective": {"rollout_correction": "token_tis"},
                "train": {"steps": steps}})  # fmt: skip
        d = config_lib.to_dict(cfg)
        fixed = repr([d[sec] for sec in train.SETUP_SECTIONS] + [d[sec][key] for sec, _, key in
                                                                 (name.partition(".") for name in train.SETUP_KEYS)])
        out = train.train(cfg, setup=setups.get(fixed))
        setups[fixed] = out["setup"]
        rows = [r for r in read_jsonl(os.path.join(cfg.train.workdir, "metrics.jsonl")) if r["kind"] == "train"]
        assert [r["step"] for r in rows] == list(range(1, steps + 1)), path
        assert np.isfinite(rows[0]["loss"]) and np.isfinite(rows[0]["grad_norm"]), (path, rows[0])
        assert all(r["staleness/max_lag"] <= steps - 1 for r in rows), rows
        if method == "luffy":
            assert rows[0]["expert/accuracy"] == 1.0, rows[0]


def test_recipes_doc_table_is_the_planners():
    """docs/recipes.md's hardware table is generated from configs/paper/plans.json (bench/plan_recipes.py)."""
    gen = runpy.run_path(os.path.join(ROOT, "bench", "plan_recipes.py"))
    doc = open(os.path.join(ROOT, "docs", "recipes.md")).read()
    assert gen["table"](BASE["PLANS"]) in doc
    assert set(BASE["PLANS"]) >= set(gen["TARGETS"]) and all(m in BASE["PLANS"] for m in BASE["MODELS"]
                                                             if m not in BASE["PLAN_OF"])  # fmt: skip
