"""Shared body of the paper recipes (configs/paper/<model>_<method>.py load it with runpy).

Whose setting each method follows (each recipe's docstring says it; ``methods.describe_objective`` labels runs):
GRPO as the EchoRL authors' script runs it (bibisbar/EchoRL exp_scripts/baseline_train_pure_grpo.sh, on LUFFY's
verl fork: mean-only group advantage, LUFFY's loss scale, entropy bonus 0.001, PPO clip, old log-probs
recomputed), since that script is the only record of how the paper's GRPO rows were trained and EchoRL's
lambda = 0.001 weighs the echo term against that loss scale; Dr.GRPO and DAPO as their papers (the presets);
LUFFY as LUFFY's script. Step delimiters as the paper's code sets them (Qwen2.5's newline and double newline,
ids 198 and 271), given as texts so that each model's tokenizer resolves them to its own ids.

The paper's setting (EchoRL, after LUFFY): OpenR1-Math-46k prompts (with DeepSeek-R1 expert traces for
LUFFY), 128 prompts x 8 rollouts per step, lr 1e-6 constant, responses up to 8192 tokens, temperature 1.0
for training and 0.6 for evaluation, no KL term. Values the paper does not give follow LUFFY's public
script (exp_scripts/train.sh): prompts up to 1024 tokens, two optimizer steps per RL step (mini-batch of
64 prompts), AdamW weight decay 0.01, gradient clipping 1.0.

LUFFY recipes follow LUFFY's script where our defaults differ (docs/recipes.md has the table, file:line):
no PPO clip on on-policy tokens (loss_remove_clip=True -> objective.policy_loss=pg), old log-probs recomputed
by the learner (rl.recompute_logp), its loss scale and entropy weighting (``luffy_reference_objective``),
expert traces longer than the response cap truncated (data.expert_overlong, the default). The
``qwen25_math_7b_think`` files are LUFFY's own setting: its model (Elliott/Qwen2.5-Math-7B-16k-think), its
prompts (R1 system prompt; data_prep --prompt-style source / r1), the assistant turn opening "<think>\n"
(data.response_prefix, also stripped from expert traces) and its reward (reward.think: "</think>" before the
answer; reward.strict=false: math-verify's own extraction, as its reward parses the whole solution).

EchoRL is off in every file but one (the baseline row of the paper's table); ``--config.echo.enabled=true``
turns it on (lambda = 0.001). (``objective.method=METHOD+echo`` would contradict the file's
``echo.enabled=False`` and is refused.) The ``qwen25_math_7b_authors`` files are the EchoRL authors' own run,
setting for setting (exp_scripts/baseline_train_pure_grpo_entropy_sft.sh, EchoRL on: ``_echorl``) and its GRPO
twin (baseline_train_pure_grpo.sh: ``_grpo``): their prompts (the dataset's own) and think-format reward on
Qwen/Qwen2.5-Math-7B, delimiter ids [198, 271], evaluation before training and every 5 steps (one sample at
temperature 0.6), a checkpoint every 5 steps (docs/recipes.md has the table, file:line).

Data: the parquet files ``python -m echorl_jax.data_prep`` writes under ``$ECHORL_DATA``
(default ``data``: ``data/openr1_math_46k.parquet``, ``data/eval/<benchmark>.parquet``); override with ``--config.data.train=...`` / ``--config.data.eval=...``.

Hardware: each model's accelerator and the setting that fits it (remat policy, packed rows per micro-batch,
KV-cache budget, decode tensor parallelism) come from the memory planner: ``bench/plan_recipes.py`` runs
``python -m echorl_jax.plan --fit`` on every model and writes ``plans.json`` beside this file, which the
recipes apply and docs/recipes.md tabulates (every phase's peak per device).
"""

import json
import os

from echorl_jax.rl import methods

DATA = os.environ.get("ECHORL_DATA", "data")  # where data_prep writes

# Hub id, family and context per model; the accelerator and its setting are in plans.json (``PLANS``).
MODELS = {
    "qwen25_math_7b": dict(
        path="Qwen/Qwen2.5-Math-7B", family="qwen2",
        # config.json says 4096 positions; LUFFY (and the paper) extend the context as here.
        context={"rope_theta_override": 40000.0, "max_position_override": 16384},
    ),
    # LUFFY's model (exp_scripts/train.sh:18): Qwen2.5-Math-7B with a 16k context and a chat template whose
    # assistant turn opens "<think>\n"; trained on LUFFY's own prompts with its think-format reward.
    "qwen25_math_7b_think": dict(
        path="Elliott/Qwen2.5-Math-7B-16k-think", family="qwen2", think=True,
        context={"rope_theta_override": 40000.0, "max_position_override": 16384},
    ),
    # The EchoRL authors' run (bibisbar/EchoRL exp_scripts/baseline_train_pure_grpo*.sh): Qwen2.5-Math-7B on the
    # dataset's own prompts (data/prepare_train.py keeps them) with LUFFY's think reward (reward_impl_version=3).
    "qwen25_math_7b_authors": dict(
        path="Qwen/Qwen2.5-Math-7B", family="qwen2", authors=True,
        context={"rope_theta_override": 40000.0, "max_position_override": 16384},
    ),
    "qwen25_math_1p5b": dict(
        path="Qwen/Qwen2.5-Math-1.5B", family="qwen2",
        context={"rope_theta_override": 40000.0, "max_position_override": 16384},
    ),
    "llama31_8b_instruct": dict(
        path="meta-llama/Llama-3.1-8B-Instruct", family="llama", context={},
    ),
    "qwen3_8b_base": dict(
        path="Qwen/Qwen3-8B-Base", family="qwen3", context={},
    ),
}
METHODS = ("grpo", "drgrpo", "dapo", "luffy")
AUTHORS_METHODS = ("grpo", "echorl")  # the authors' two scripts: GRPO, and GRPO + EchoRL
AUTHORS = "EchoRL authors' script"  # methods.SCRIPTS key: the objective fields of their GRPO

PROMPTS, GROUP, PROMPT_LEN, RESPONSE_LEN, MINIBATCHES = 128, 8, 1024, 8192, 2

# LUFFY's loss, per optimizer step (its mini-batch: 64 prompts x 8 = 512 rows on 8 GPUs, 64 rows each):
# every GPU sums, over its micro-batches m (dynamic, <= 32768 tokens each: train.sh:40-41),
#     sum_{t in m} loss_t / 8192  -  0.001 * mean_{t in m} entropy_t        (mix_core_alg.py:233-234, mix_actor.py:202,226)
# with gradient_accumulation = 1 (mix_fsdp_worker.py:88-91: mini = micro = 64 rows per GPU), and FSDP averages
# the 8 GPUs' gradients. That is sum_t loss_t / (8 * 8192) - 0.001 * sum_t entropy_t / (8 * n_m) over the
# mini-batch, n_m = response tokens per micro-batch. Ours with seq-mean-token-sum-norm divides by
# (512 rows * norm_length): norm_length = 8 * 8192 / 512 = 128 gives LUFFY's scale exactly (so its gradient
# clipping at 1.0 clips the same gradients), and entropy_norm_tokens = 8 * n_m / 512 its entropy weight.
# n_m: micro-batches are balanced partitions of a GPU's rows into ceil(tokens / 32768) parts, ~28k tokens
# each at LUFFY's lengths, ~93% of them response tokens: n_m ~ 26,000 (an estimate; it moves ~10% with the
# response length step to step).
REF_GPUS, REF_MICRO_RESPONSE_TOKENS = 8, 26_000


def reference_scale() -> dict:
    """LUFFY's fork's loss scale and entropy weighting on its 8 GPUs (see the comment above)."""
    rows = PROMPTS // MINIBATCHES * GROUP  # rows per optimizer step
    return {"norm_length": RESPONSE_LEN * REF_GPUS // rows,
            "entropy_norm_tokens": round(REF_MICRO_RESPONSE_TOKENS * REF_GPUS / rows)}


def luffy_reference_objective() -> dict:
    """The objective fields that make the luffy preset LUFFY's script: loss_remove_clip=True (train.sh:84,
    policy_loss=pg: no PPO clip on on-policy tokens) and its loss scale."""
    return {**methods.script_fields("luffy", "LUFFY's script"), **reference_scale()}


def authors_grpo_objective() -> dict:
    """The objective fields that make the grpo preset the EchoRL authors' GRPO (their script on LUFFY's fork):
    grpo_use_std=False (estimator=drgrpo), loss_remove_token_mean=True (seq-mean-token-sum-norm at LUFFY's
    scale), entropy_coeff=0.001 weighted as there, the PPO clip kept."""
    return {**methods.script_fields("grpo", AUTHORS), **reference_scale()}


def methods_of(model: str) -> tuple:
    return AUTHORS_METHODS if MODELS[model].get("authors") else METHODS


_PLANS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plans.json")
PLANS = json.load(open(_PLANS_FILE)) if os.path.exists(_PLANS_FILE) else {}  # bench/plan_recipes.py writes it
# Same architecture and shapes: the same plan (the authors' recipe is also planned on its own: plans.json "recipes").
PLAN_OF = {"qwen25_math_7b_think": "qwen25_math_7b", "qwen25_math_7b_authors": "qwen25_math_7b"}


def planned(model: str) -> dict:
    """The planner's setting for ``model`` as config sections (``{"model": {"remat": ...}, ...}``); none for a
    model not planned yet (tests/test_paper_recipes.py requires every shipped model to be)."""
    out: dict = {}
    for key, value in PLANS.get(PLAN_OF.get(model, model), {}).get("overrides", {}).items():
        section, field = key.split(".")
        out.setdefault(section, {})[field] = value
    return out


def paper_config(model: str, method: str) -> dict:
    m = MODELS[model]
    if method not in methods_of(model):
        raise ValueError(f"paper recipes of {model} cover {methods_of(model)}, not {method!r}")
    cfg = _common(m, model, method)
    for section, fields in planned(model).items():
        cfg[section].update(fields)
    if method in ("grpo", "echorl"):  # the authors' GRPO (their script; the module docstring says why)
        cfg["objective"].update(method="grpo", **authors_grpo_objective())
        cfg["rl"]["recompute_logp"] = True  # mix_trainer.py:533-536 (and the mismatch is measured every step)
    elif method == "luffy":
        cfg["objective"].update(luffy_reference_objective())
        cfg["rl"]["recompute_logp"] = True  # mix_trainer.py:496-499 (and the mismatch is measured every step)
        cfg["data"]["expert_overlong"] = "truncate"  # rl_dataset_with_target.py:143-153
    else:
        cfg["train"]["mismatch_every"] = 10  # sampler-vs-learner mismatch, one extra forward every 10 steps
    if m.get("think") or m.get("authors"):
        # LUFFY's prompts (data_prep --prompt-style source: the dataset's own R1 system prompt; r1 for the eval
        # sets, as LUFFY's data/valid.parquet) and its reward (math_verify_reward.py:36-46, main_mix_ppo.py:94-96:
        # "</think>" required, the text after it parsed by math-verify's own extraction). The authors' run reads
        # the same file (their data/prepare_train.py) with reward_impl_version=3 (the same reward); their
        # validation file (valid.parquet) is not published: MATH-500 with the same R1-style prompts stands in.
        cfg["data"].update(train=f"{DATA}/openr1_math_46k_source.parquet", eval=f"{DATA}/eval/math500_r1.parquet")
        cfg["reward"].update(think=True, strict=False)
    if m.get("think"):
        # The 16k-think model's turn opens "<think>\n" (its template writes it; the key guarantees it and strips
        # it from expert traces: rl_dataset_with_target.py:129-130). Qwen2.5-Math-7B's own template does not.
        cfg["data"]["response_prefix"] = "<think>\n"
    if m.get("authors"):
        # bibisbar/EchoRL exp_scripts/baseline_train_pure_grpo_entropy_sft.sh, line by line (docs/recipes.md):
        # EchoClip on (:114-118: coefficient 0.001, success = reward 1.0, delimiters Qwen2.5's ids 198 and 271),
        # validation before training and every 5 steps, one sample at 0.6 (:88, :92, :75, :78), a checkpoint
        # every 5 steps keeping 2 (:91, :110).
        cfg["echo"].update(enabled=method == "echorl", success_threshold=1.0, delimiter_ids=(198, 271))
        cfg["train"].update(eval_every=5, eval_samples=1, eval_temperature=0.6, save_every=5, keep_checkpoints=2)
    return cfg


def _common(m: dict, model: str, method: str) -> dict:
    return {
        "model": {"path": m["path"], "param_dtype": "float32", "compute_dtype": "bfloat16",
                  **m["context"]},
        "mesh": {"shape": (1, -1, 1)},  # FSDP over every device
        # Prompts are chat messages (data_prep): rendered with the tokenizer's chat template.
        "data": {"train": f"{DATA}/openr1_math_46k.parquet", "eval": f"{DATA}/eval/math500.parquet",
                 "max_prompt_len": PROMPT_LEN, "on_overlong": "drop"},
        "sampling": {"temperature": 1.0, "max_new_tokens": RESPONSE_LEN},
        "reward": {"name": "math"},
        "objective": {"method": method},
        # The paper's code splits steps at Qwen2.5's "\n" and "\n\n" (newline_token_ids=[198,271]): as texts,
        # each tokenizer resolves them to its own ids (start-up fails if one is not a single token).
        "echo": {"enabled": False, "coef": 0.001, "delimiter_ids": ("\n", "\n\n")},
        "rl": {"prompts_per_step": PROMPTS, "group_size": GROUP, "minibatches": MINIBATCHES},
        "optim": {"learning_rate": 1e-6, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.01,
                  "max_grad_norm": 1.0},
        "train": {"steps": 500, "workdir": f"runs/paper/{model}_{method}", "eval_every": 50, "eval_samples": 1,
                  "eval_temperature": 0.6, "save_every": 50, "echo_grad_norm_every": 50},
    }
