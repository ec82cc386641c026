"""Step-entropy analysis of verified solutions (the paper's motivating figure).

    python -m echorl_jax.analyze_steps --model HF_DIR_OR_HUB_ID --data FILE [--source expert|rollouts]
        [--out analysis/] [--max-len 8192] [--batch 8] [--limit N] [--temperature 1.0] [--delimiter-ids auto]

``--source expert``: FILE is a data_prep parquet with an ``expert`` column
(OpenR1-Math-46k's DeepSeek-R1 traces). ``--source rollouts``: FILE is the
``--responses`` JSONL of ``echorl_jax.evaluate``; only responses graded correct
are used (the model's own successful rollouts).

Each prompt + solution is teacher-forced through the model (``update.response_logp``:
token entropy of the full next-token distribution at ``--temperature``). Steps
are split and scored exactly as EchoRL does (``echo.step_ends`` / ``echo.step_stats``
over the delimiters ``--delimiter-ids`` names, as ``echo.delimiter_ids``: ``auto``, the tokenizer's
newline tokens, or a list such as ``[198,271]``; ``echo.resolve_delimiters``): a step ends
with its delimiter, its score is the mean token entropy. Per solution: the step
count, the argmax-entropy step ``s*``, its relative position (end of ``s*`` /
solution length, as ``echo/mean_clip_rel_pos``) and the EchoClip length (tokens
from the first through the end of ``s*``). Writes ``summary.json`` (with every
solution's numbers), ``summary.md`` and three PNGs: the histogram of ``s*``'s
relative position, the mean step entropy along the solution (10 position bins),
and the clip-length / step-count histograms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

BINS = 10


def load_solutions(path: str, source: str, limit: int = 0) -> list[tuple[object, str, str]]:
    """``(prompt, solution, data_source)`` triples: expert traces, or the correct responses of evaluate."""
    from echorl_jax.data.formats import DataError, load_records

    if source == "expert":
        records = load_records(path)
        if records and "expert" not in records[0]:
            raise DataError(f"{path}: --source expert needs an 'expert' column (data_prep's openr1_math_46k has "
                            f"one); the file has columns {sorted(records[0])}")  # fmt: skip
        out = [(r["prompt"], r["expert"], r["data_source"]) for r in records if isinstance(r.get("expert"), str)]
    elif source == "rollouts":
        out = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not {"prompt", "response", "correct"} <= set(row):
                    raise DataError(f"{path}, line {n}: --source rollouts reads evaluate --responses lines "
                                    f"(prompt, response, correct); found keys {sorted(row)}")  # fmt: skip
                if row["correct"]:
                    out.append((row["prompt"], row["response"], row.get("data_source", "")))
    else:
        raise DataError(f"--source {source!r}: expected 'expert' or 'rollouts'")
    out = [x for x in out if x[1]]
    return out[:limit] if limit else out


def _tokenize(tokenizer, solutions, template: str, max_len: int):
    from echorl_jax.data.pipeline import tokenize_prompts

    prompts = tokenize_prompts([p for p, _, _ in solutions], tokenizer, template)
    answers = [tokenizer.encode(s, add_special_tokens=False)[:max_len] for _, s, _ in solutions]
    return prompts, answers


def step_table(model_dir: str, solutions, *, template: str = "auto", max_len: int = 8192, batch: int = 8,
               temperature: float = 1.0, tokenizer_dir: str = "", delimiter_ids="auto") -> list[dict]:
    """Per solution: its step entropies and where the argmax step falls (module docstring)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from echorl_jax import sharding
    from echorl_jax.config import ConfigError
    from echorl_jax.models import hf
    from echorl_jax.models.hub import resolve_model_dir
    from echorl_jax.models.tokenizer import load_hf_tokenizer, pad_token_id
    from echorl_jax.rl import echo, update

    model_dir = resolve_model_dir(model_dir)
    tokenizer = load_hf_tokenizer(resolve_model_dir(tokenizer_dir, "--tokenizer") or model_dir, key="--model")
    try:  # before the weights load: a bad value fails at once
        delims = jnp.asarray(echo.resolve_delimiters(tokenizer, delimiter_ids)[0], jnp.int32)
    except ValueError as e:
        raise ConfigError(str(e).replace("echo.delimiter_ids", "--delimiter-ids")) from None
    mesh = sharding.make_mesh((-1, 1, 1), jax.devices())
    graphdef, params = nnx.split(hf.load_model(model_dir, mesh))
    pad = pad_token_id(tokenizer)[0]  # padding is masked: any id serves
    prompts, answers = _tokenize(tokenizer, solutions, template, max_len)
    P, T = max(map(len, prompts)), max(map(len, answers))
    rows = -(-batch // sharding.batch_divisor(mesh)) * sharding.batch_divisor(mesh)

    @jax.jit
    def analyse(params, tokens_bs, valid_bs, mask_bt):
        _, entropy_bt = update.response_logp(graphdef, params, tokens_bs, valid_bs, T, temperature)
        end_bt = echo.step_ends(tokens_bs[:, P:], mask_bt, delims)
        mean_bt, len_bt = echo.step_stats(entropy_bt, mask_bt, end_bt)
        return end_bt, mean_bt, len_bt

    out = []
    for start in range(0, len(solutions), rows):
        idx = list(range(start, min(start + rows, len(solutions))))
        tokens = np.full((rows, P + T), pad, np.int32)
        valid = np.zeros((rows, P + T), bool)
        for r, i in enumerate(idx):  # left-padded prompt, right-padded solution: the trainer's layout
            p, a = prompts[i], answers[i]
            tokens[r, P - len(p) : P], tokens[r, P : P + len(a)] = p, a
            valid[r, P - len(p) : P + len(a)] = True
        batch_sh = sharding.batch_sharding(mesh, 2)
        # every process holds the whole batch and places its devices' rows (multi-process: one global array)
        put = lambda x: jax.make_array_from_callback(x.shape, batch_sh, lambda idx: x[idx])  # noqa: E731
        end_bt, mean_bt, len_bt = map(sharding.to_host, analyse(params, put(tokens), put(valid), put(valid[:, P:])))
        for r, i in enumerate(idx):
            ends = np.flatnonzero(end_bt[r])
            if len(ends) == 0:
                continue
            scores = mean_bt[r, ends]
            best = int(np.argmax(scores))  # first max: the earliest step wins ties, as echo_clips
            n_tok = len(answers[i])
            out.append({
                "index": i, "data_source": solutions[i][2], "tokens": n_tok, "steps": len(ends),
                "argmax_step": best, "clip_len": int(ends[best]) + 1, "rel_pos": (int(ends[best]) + 1) / n_tok,
                "step_entropy": [float(x) for x in scores], "step_len": [int(x) for x in len_bt[r, ends]],
                "step_end": [int(x) for x in ends], "truncated": len(answers[i]) == max_len,
            })  # fmt: skip
    return out


def summarize(table: list[dict]) -> dict:
    """Aggregates over solutions: argmax-position histogram, entropy profile, clip lengths, step counts."""
    if not table:
        return {"solutions": 0}
    rel = np.array([t["rel_pos"] for t in table])
    clip = np.array([t["clip_len"] for t in table])
    steps = np.array([t["steps"] for t in table])
    hist, edges = np.histogram(rel, bins=BINS, range=(0.0, 1.0))
    # Entropy profile: every step placed at its end's relative position, averaged per bin.
    pos = np.concatenate([(np.array(t["step_end"]) + 1) / t["tokens"] for t in table])
    ent = np.concatenate([t["step_entropy"] for t in table])
    which = np.minimum((pos * BINS).astype(int), BINS - 1)
    profile = [float(ent[which == b].mean()) if (which == b).any() else None for b in range(BINS)]
    stat = lambda x: {"mean": float(x.mean()), "median": float(np.median(x)), "min": int(x.min()), "max": int(x.max())}
    return {
        "solutions": len(table), "truncated": int(sum(t["truncated"] for t in table)),
        "argmax_rel_pos": {"mean": float(rel.mean()), "median": float(np.median(rel)),
                           "histogram": hist.tolist(), "bin_edges": edges.tolist()},
        "argmax_in_first_half": float((rel <= 0.5).mean()),
        "entropy_profile": profile, "clip_len": stat(clip), "steps": stat(steps),
        "clip_frac": float((clip / np.array([t["tokens"] for t in table])).mean()),
    }  # fmt: skip


def markdown(summary: dict, label: str) -> str:
    if not summary["solutions"]:
        return f"# Step entropy: {label}\n\nno verified solutions\n"
    s, r = summary, summary["argmax_rel_pos"]
    lines = [f"# Step entropy: {label}", "", "| quantity | mean | median | min | max |", "|---|---:|---:|---:|---:|",
             f"| steps per solution | {s['steps']['mean']:.1f} | {s['steps']['median']:.0f} | {s['steps']['min']} | "
             f"{s['steps']['max']} |",
             f"| clip length (tokens) | {s['clip_len']['mean']:.1f} | {s['clip_len']['median']:.0f} | "
             f"{s['clip_len']['min']} | {s['clip_len']['max']} |",
             f"| argmax-step relative position | {r['mean']:.3f} | {r['median']:.3f} | | |", "",
             f"{s['solutions']} solutions ({s['truncated']} truncated at --max-len); the argmax step ends in the "
             f"first half in {100 * s['argmax_in_first_half']:.1f}%; clips are {100 * s['clip_frac']:.1f}% of their "
             "solution on average.", "",
             "| relative position | " + " | ".join(f"{e:.1f}-{e + 1 / BINS:.1f}" for e in np.arange(BINS) / BINS) + " |",
             "|---|" + "---:|" * BINS,
             "| argmax step (count) | " + " | ".join(str(c) for c in r["histogram"]) + " |",
             "| mean step entropy | " + " | ".join("-" if v is None else f"{v:.3f}" for v in s["entropy_profile"])
             + " |"]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(summary: dict, table: list[dict], out_dir: str, label: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths, centers = [], (np.arange(BINS) + 0.5) / BINS
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(centers, summary["argmax_rel_pos"]["histogram"], width=1 / BINS, edgecolor="k")
    ax.set(xlabel="relative position of the highest-entropy step", ylabel="solutions", title=label)
    paths.append(os.path.join(out_dir, "argmax_position.png"))
    fig.tight_layout(), fig.savefig(paths[-1], dpi=120), plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    prof = [np.nan if v is None else v for v in summary["entropy_profile"]]
    ax.plot(centers, prof, marker="o")
    ax.set(xlabel="relative position in the solution", ylabel="mean step entropy (nats)", title=label)
    paths.append(os.path.join(out_dir, "entropy_profile.png"))
    fig.tight_layout(), fig.savefig(paths[-1], dpi=120), plt.close(fig)
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.hist([t["clip_len"] for t in table], bins=20, edgecolor="k")
    a.set(xlabel="EchoClip length (tokens)", ylabel="solutions")
    b.hist([t["steps"] for t in table], bins=20, edgecolor="k")
    b.set(xlabel="steps per solution")
    paths.append(os.path.join(out_dir, "clip_len_steps.png"))
    fig.tight_layout(), fig.savefig(paths[-1], dpi=120), plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    from echorl_jax import config as config_lib
    from echorl_jax.cli import exit_when_a_process_is_lost, maybe_init_distributed, user_errors

    p = argparse.ArgumentParser(prog="python -m echorl_jax.analyze_steps", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory or Hub id")
    p.add_argument("--data", required=True, help="data_prep parquet (expert) or evaluate --responses JSONL (rollouts)")
    p.add_argument("--source", default="expert", choices=("expert", "rollouts"))
    p.add_argument("--out", default="analysis", help="output directory")
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default: the model's)")
    p.add_argument("--template", default="auto", help="prompt template, as data.template")
    p.add_argument("--max-len", type=int, default=8192, help="solution tokens kept (longer ones are cut)")
    p.add_argument("--batch", type=int, default=8, help="solutions per forward pass")
    p.add_argument("--limit", type=int, default=0, help="analyse the first N solutions only")
    p.add_argument("--temperature", type=float, default=1.0, help="entropy of softmax(logits / T)")
    p.add_argument("--delimiter-ids", default="auto", help="step delimiters, as echo.delimiter_ids: auto or a "
                   "list of token ids / one-token texts, e.g. [198,271]")
    args = p.parse_args(argv)
    dist = config_lib.DistConfig()  # multi-process from the env (JAX_COORDINATOR_ADDRESS ...) or a TPU VM
    try:
        maybe_init_distributed(dist)
        solutions = load_solutions(args.data, args.source, args.limit)
        with exit_when_a_process_is_lost(dist):
            table = step_table(args.model, solutions, template=args.template, max_len=args.max_len,
                               batch=args.batch, temperature=args.temperature, tokenizer_dir=args.tokenizer,
                               delimiter_ids=args.delimiter_ids)  # fmt: skip
    except user_errors() as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() != 0:  # every process computed the same table; process 0 writes it
        return 0
    label = f"{os.path.basename(args.model.rstrip('/'))}, {args.source}"
    summary = summarize(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"model": args.model, "data": args.data, "source": args.source, "summary": summary,
                   "solutions": table}, f, indent=1)  # fmt: skip
    text = markdown(summary, label)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    if table:
        plot(summary, table, args.out, label)
    print(text)
    return 0

