"""Plans the paper recipes with the memory planner and writes what the recipes and docs say about hardware.

    python bench/plan_recipes.py                 # plan every target (tens of minutes on CPU), then --write
    python bench/plan_recipes.py --only qwen25_math_7b
    python bench/plan_recipes.py --only qwen25_math_7b_authors_echorl   # one recipe, with its model's setting
    python bench/plan_recipes.py --write         # only regenerate the files from configs/paper/plans.json

For each model's target accelerator (``TARGETS``), ``python -m echorl_jax.plan --fit`` runs on
``devices`` fake CPU devices on the model's GRPO recipe with EchoRL on (the paper's runs; the echo
diagnostic is a phase of its own), reading the shipped config.json (configs/paper/models/); the
setting it finds is then planned for the LUFFY recipe too (G - k rollouts, recomputed log-probs), and for
the recipes of ``RECIPES`` (a model's own setting with another objective: the EchoRL authors' run).
Results go to ``configs/paper/plans.json``, which ``configs/paper/_base.py`` reads: the recipes take
the setting found, their docstrings state the accelerator and every phase's peak, and the table between
the ``plan-table`` markers of docs/recipes.md is rewritten. ``STRETCH`` rows are planned for docs only.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "configs", "paper")
PLANS = os.path.join(PAPER, "plans.json")
DOC = os.path.join(ROOT, "docs", "recipes.md")

# model -> (accelerator, devices). The 7B model on the reference's node (LUFFY: 8 x A100-80GB), the 1.5B
# model on the cheapest TPU slice, the 8B models on one 8 x 80 GB node.
TARGETS = {
    "qwen25_math_7b": ("h100", 8),
    "qwen25_math_1p5b": ("v5e", 8),
    "llama31_8b_instruct": ("h100", 8),
    "qwen3_8b_base": ("h100", 8),
}
STRETCH = {"qwen25_math_7b@v5p-8": ("qwen25_math_7b", "v5p", 4)}
# Recipes planned on their own with their model's setting (no --fit): recipe -> the plans.json key it reads.
RECIPES = {"qwen25_math_7b_authors_echorl": "qwen25_math_7b"}
MODEL_DIR = {"qwen25_math_7b_authors": "qwen25_math_7b"}  # its config.json: the same model
LABEL = {"h100": "8 × 80 GB (one node of 8 H100 or A100 80GB)", "v5e": "TPU v5e-8 (8 × 16 GB)",
         "v5p": "TPU v5p-8 (4 × 95 GB)"}  # fmt: skip


def command(model: str, method: str, accel: str, devices: int, fit: bool, overrides: dict | None = None) -> list:
    cmd = [sys.executable, "-m", "echorl_jax.plan", "--config", f"configs/paper/{model}_{method}.py", "--devices",
           str(devices), f"--config.model.path=configs/paper/models/{MODEL_DIR.get(model, model)}",
           "--config.echo.enabled=true"]  # fmt: skip
    if fit:
        cmd += ["--fit", accel]
    for k, v in (overrides or {}).items():
        cmd.append(f"--config.{k}={v}")
    return cmd


def run(cmd: list) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        print("$", " ".join(cmd[1:]), flush=True)
        done = subprocess.run([*cmd, "--json", out], cwd=ROOT, text=True, capture_output=True,
                              env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip
        print(done.stdout[-3000:], done.stderr[-2000:], flush=True)
        if done.returncode != 0 or not os.path.exists(out):
            raise SystemExit(f"planner failed ({done.returncode}): {' '.join(cmd)}")
        with open(out) as f:
            return json.load(f)


def plan_target(model: str, accel: str, devices: int) -> dict:
    grpo = run(command(model, "grpo", accel, devices, fit=True))
    luffy = run(command(model, "luffy", accel, devices, fit=False, overrides=grpo["overrides"]))
    return {"accelerator": accel, "devices": devices, "overrides": grpo["overrides"],
            "command": " ".join(["python", *command(model, "grpo", accel, devices, fit=True)[1:]]),
            "grpo": grpo, "luffy": luffy}  # fmt: skip


def plan_recipe(recipe: str, p: dict) -> dict:
    """``recipe`` planned with the setting ``p`` (a plans.json target) found for its model."""
    model, _, method = recipe.rpartition("_")
    return run(command(model, method, p["accelerator"], p["devices"], fit=False, overrides=p["overrides"]))


def own_plan(plans: dict, stem: str) -> dict:
    """The plan a recipe file (``stem``: its name without .py) states: its model's recipe planned on its own
    (``RECIPES``), else its model's GRPO plan."""
    model = stem.rpartition("_")[0]
    base = runpy.run_path(os.path.join(PAPER, "_base.py"))["PLAN_OF"]
    p = plans[base.get(model, model)]
    return next((r for name, r in p.get("recipes", {}).items() if name.rpartition("_")[0] == model), p["grpo"])


def _gb(v: float) -> str:
    return f"{v:.1f}"


def table(plans: dict) -> str:
    rows = ["| recipe | accelerator | setting found (`--fit`) | train step | log-prob pass | echo diag. | sampler | "
            "held-out | peak / device |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, p in plans.items():
        model = key.split("@")[0]
        o = p["overrides"]
        setting = (f"remat `{o['model.remat']}`, {o['rl.pack_rows_per_micro_batch']} packed row(s), KV "
                   f"{o['sampling.kv_cache_memory'] / 1e9:g} GB, decode tp {o['sampling.decode_tensor_parallel']}")
        for method in ("grpo", "luffy"):
            ph = p[method]["phases"]
            cells = [_gb(ph[n]) if n in ph else "–" for n in ("train step", "log-prob pass", "echo diagnostic",
                                                               "sampler", "held-out sampler")]  # fmt: skip
            cap = {"h100": 80, "v5e": 16, "v5p": 95}[p["accelerator"]]
            peak = p[method]["peak_gb"]
            name = f"`{model}_{'grpo` (drgrpo, dapo)' if method == 'grpo' else 'luffy`'}"
            rows.append(f"| {name} | {LABEL[p['accelerator']]} | {setting} | " + " | ".join(cells)
                        + f" | **{peak:.1f} GB ({peak / cap:.1%})** |")  # fmt: skip
        for recipe, r in p.get("recipes", {}).items():
            cells = [_gb(r["phases"][n]) if n in r["phases"] else "–" for n in ("train step", "log-prob pass",
                     "echo diagnostic", "sampler", "held-out sampler")]  # fmt: skip
            cap, peak = {"h100": 80, "v5e": 16, "v5p": 95}[p["accelerator"]], r["peak_gb"]
            rows.append(f"| `{recipe}` (and its GRPO twin) | {LABEL[p['accelerator']]} | {setting} | " + " | ".join(cells)
                        + f" | **{peak:.1f} GB ({peak / cap:.1%})** |")  # fmt: skip
    return "\n".join(rows)


def docstring_line(p: dict, own: dict) -> str:
    """The Accelerator block of a recipe's docstring: its model's setting ``p`` and its own plan ``own``."""
    o = p["overrides"]
    worst = max(own["phases"], key=own["phases"].get)
    return (f"Accelerator: {LABEL[p['accelerator']]}; mesh (1, -1, 1) (FSDP); planned with EchoRL on by\n"
            f"{p['command'].replace('python -m', 'python -m', 1)}\n"
            f"(configs/paper/plans.json): model.remat={o['model.remat']}, rl.pack_rows_per_micro_batch="
            f"{o['rl.pack_rows_per_micro_batch']},\nsampling.kv_cache_memory={o['sampling.kv_cache_memory'] / 1e9:g}e9, "
            f"sampling.decode_tensor_parallel={o['sampling.decode_tensor_parallel']}; peak "
            f"{own['peak_gb']:.1f} GB per device ({worst}).")  # fmt: skip


def write(plans: dict) -> None:
    import re

    with open(PLANS, "w") as f:
        json.dump(plans, f, indent=1)
        f.write("\n")
    with open(DOC) as f:
        doc = f.read()
    begin, end = "<!-- plan-table: bench/plan_recipes.py writes this table -->", "<!-- /plan-table -->"
    doc = doc[: doc.index(begin) + len(begin)] + "\n" + table(plans) + "\n" + doc[doc.index(end) :]
    with open(DOC, "w") as f:
        f.write(doc)
    base = runpy.run_path(os.path.join(PAPER, "_base.py"))["PLAN_OF"]  # same architecture and shapes: same plan
    for path in sorted(os.listdir(PAPER)):
        if not path.endswith(".py") or path.startswith("_"):
            continue
        model = path[: -len(".py")].rpartition("_")[0]
        p = plans.get(base.get(model, model))
        if p is None:
            continue
        full = os.path.join(PAPER, path)
        with open(full) as f:
            text = f.read()
        line = docstring_line(p, own_plan(plans, path[: -len(".py")]))
        text = re.sub(r"\nAccelerator: .*?\n(?=Run:)", "\n" + line + "\n", text, count=1, flags=re.S)
        with open(full, "w") as f:
            f.write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated models (TARGETS / STRETCH keys) to plan")
    ap.add_argument("--write", action="store_true", help="only rewrite the files from configs/paper/plans.json")
    args = ap.parse_args()
    plans = json.load(open(PLANS)) if os.path.exists(PLANS) else {}
    if not args.write:
        todo = {**{m: (m, *t) for m, t in TARGETS.items()}, **STRETCH}
        for key, (model, accel, devices) in todo.items():
            if args.only and key not in args.only.split(","):
                continue
            plans[key] = plan_target(model, accel, devices)
            with open(PLANS, "w") as f:  # after each target: a long run keeps what it has
                json.dump(plans, f, indent=1)
        for recipe, key in RECIPES.items():
            if args.only and recipe not in args.only.split(",") and key not in args.only.split(","):
                continue
            plans[key].setdefault("recipes", {})[recipe] = plan_recipe(recipe, plans[key])
            with open(PLANS, "w") as f:
                json.dump(plans, f, indent=1)
    write(plans)


if __name__ == "__main__":
    main()
