"""Benchmark evaluation: avg@k and pass@k per benchmark, laid out like the paper's table.

    python -m echorl_jax.evaluate [--config FILE] [--checkpoint WORKDIR_OR_STEP_DIR | --model HF_DIR_OR_HUB_ID]
        --data data/eval/aime24.parquet,data/eval/math500.parquet,... [--k 8] [--temperature 0.6]
        [--top-p 0.95] [--max-new-tokens N] [--batch N] [--seed 0] [--out results.json] [--config.KEY=VALUE ...]

The run is built exactly as training builds it (``setup.build_setup``: mesh,
sharded model, tokenizer, stops, verifier router, eval sampler) with the eval
files as its data; responses are graded by ``grading.grade`` and summarized
by ``grading.summarize``, per benchmark (data_source). ``--checkpoint``
restores the params of a training checkpoint (``checkpoint.Checkpointer``):
a workdir (its latest step) or one step directory ``WORKDIR/checkpoints/STEP``;
without ``--config`` the checkpoint's own config is used. ``--model`` evaluates a
Hugging Face directory or Hub id. Writes the markdown table next to the JSON
(``--out results.json`` -> ``results.md``) and prints it.

Memory: only what evaluation needs is built: the parameters (sharded as in
training), no optimizer state and no reference copy; ``--checkpoint`` reads only
the parameters of the saved train state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULTS = dict(k=8, temperature=0.6, top_p=0.95)  # the paper's protocol (temperature 0.6)


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m echorl_jax.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="training config file (default: the checkpoint's, or the built-in)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default="", help="a training workdir (latest step) or WORKDIR/checkpoints/STEP")
    src.add_argument("--model", default="", help="a Hugging Face model directory or Hub id (sets model.path)")
    p.add_argument("--data", required=True, help="comma-separated eval files (data_prep outputs)")
    p.add_argument("--k", type=int, default=DEFAULTS["k"], help="samples per prompt (avg@k, pass@k)")
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="0 = greedy")
    p.add_argument("--top-p", type=float, default=DEFAULTS["top_p"])
    p.add_argument("--max-new-tokens", type=int, default=0, help="response length (default: the config's)")
    p.add_argument("--batch", type=int, default=0, help="prompts per sampling call (default: rl.prompts_per_step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval_results.json", help="JSON results; the table goes to the same name .md")
    p.add_argument("--responses", default="", help="also write every response (JSONL: index, data_source, "
                   "sample, response, correct): analyze_steps --source rollouts reads it")
    p.add_argument("--label", default="", help="row label in the table (default: the model, or for a checkpoint "
                   "its method, whose setting it follows and EchoRL on/off, then the checkpoint)")
    return p.parse_known_args(argv)


def checkpoint_location(path: str) -> tuple[str, int | None]:
    """``(checkpoints directory, step or None = latest)`` for a workdir, its checkpoints dir, or a step dir."""
    from echorl_jax.trainer import storage
    from echorl_jax.trainer.checkpoint import CheckpointError

    path = path.rstrip("/") if storage.is_remote(path) else os.path.abspath(path)
    if storage.isdir(storage.join(path, "checkpoints")):
        return storage.join(path, "checkpoints"), None
    base = os.path.basename(path)
    if base.isdigit() and storage.isdir(path):
        return os.path.dirname(path), int(base)
    if storage.isdir(path) and any(d.isdigit() for d in storage.listdir(path)):
        return path, None
    raise CheckpointError(f"--checkpoint {path!r}: not a training workdir (no checkpoints/ inside), a checkpoints "
                          "directory or a step directory WORKDIR/checkpoints/STEP")  # fmt: skip


def _strip_architecture(values: dict) -> dict:
    """With model.path set, the architecture comes from its config.json: drop the default/saved arch fields."""
    from echorl_jax import config as config_lib

    model = values.get("model", {})
    if not model.get("path"):
        return values
    arch = config_lib.architecture_fields()
    return dict(values, model={k: v for k, v in model.items() if k not in arch})


def base_values(args, host_config: dict | None) -> dict:
    from echorl_jax import config as config_lib
    from echorl_jax.cli import default_values

    if args.config:
        return config_lib.load_config_file(args.config)
    if host_config is not None:
        return host_config
    return default_values()


def _rows_per_call(batch: int, group_size: int, divisor: int, num_records: int) -> int:
    """Prompts per call: at most ``batch`` and the record count, and ``prompts x group`` a multiple of the mesh's
    batch axes (build_setup's rule for a step's rows)."""
    for p in range(min(batch, num_records), 0, -1):
        if (p * group_size) % divisor == 0:
            return p
    return max(1, divisor // group_size)  # fewer records than devices: rows are padded by the eval pipeline


def eval_config(args, overrides: dict, host_config: dict | None):
    """The training config turned into an evaluation run over ``--data``."""
    from echorl_jax import config as config_lib, sharding
    from echorl_jax.data.formats import load_files

    values = dict(base_values(args, host_config))
    if args.model:
        values = config_lib.merge_given(values, {"model": {"path": args.model}})
    values = _strip_architecture(config_lib.merge_given(values, overrides))
    files = tuple(f for f in args.data.split(",") if f)
    cfg = config_lib.build_config(values)
    # The files are eval data: their column keys are the eval ones (data.eval_*, defaulting to data.*).
    keys = (cfg.data.eval_prompt_key or cfg.data.prompt_key, cfg.data.eval_answer_key or cfg.data.answer_key)
    records = load_files(files, *keys, key_prefix="data.eval_")
    import jax

    devices = jax.devices()[: cfg.mesh.num_devices or None]
    divisor = sharding.batch_divisor(sharding.make_mesh(cfg.mesh.shape, devices))
    prompts = _rows_per_call(args.batch or cfg.rl.prompts_per_step, cfg.rl.group_size, divisor, len(records))
    sampling = {"top_p": args.top_p}
    if args.max_new_tokens:
        sampling["max_new_tokens"] = args.max_new_tokens
    evaluation = {
        # train = the eval files (nothing else needs to exist); a prompt too long fails rather than being skipped
        "data": {"train": files, "eval": files, "on_overlong": "error", "prompt_key": keys[0], "answer_key": keys[1]},
        "sft": {"steps": 0},
        "rl": {"prompts_per_step": prompts, "minibatches": 1, "micro_batches": 1},
        "sampling": sampling,
        "train": {"eval_samples": args.k, "eval_temperature": args.temperature, "progress": False},
    }
    if args.checkpoint and not args.model and cfg.model.lora.enabled and cfg.sft.steps > 0:
        # The adapters were trained on the warm-started base: rebuild it as the run did (its training data and
        # SFT settings; the run's cache, workdir/warmstart, makes that a load). The base check then applies.
        evaluation["data"].pop("train")
        evaluation.pop("sft")
    return config_lib.build_config(config_lib.merge_given(values, evaluation))


def run(args, overrides: dict) -> dict:
    import jax
    import numpy as np

    from echorl_jax.evaluation import paper_table
    from echorl_jax.trainer import adapters, grading, storage
    from echorl_jax.trainer.checkpoint import Checkpointer, CheckpointError, skipped
    from echorl_jax.trainer.setup import build_setup

    host_config, ckpt_dir, step = None, None, None
    if args.checkpoint:
        ckpt_dir, step = checkpoint_location(args.checkpoint)
        ckpt = Checkpointer(ckpt_dir, async_save=False)
        host_config = ckpt.read_host(step).get("config")
        if host_config is None and not args.config:
            raise CheckpointError(f"{ckpt_dir}: the checkpoint holds no config; pass --config")
    cfg = eval_config(args, overrides, host_config)
    s = build_setup(cfg, training=False)
    params = s.state.params
    if ckpt_dir is not None:  # the saved optimizer state is skipped, not read
        if s.base_identity is not None:  # LoRA: the adapters fit only the base they were trained on
            adapters.check_base(ckpt.read_host(step).get("lora_base"), s.base_identity, ckpt_dir,
                                step if step is not None else ckpt.latest_step(), resume=False)
        skip = skipped(jax.eval_shape(s.optimizer.init, params))
        step, state, _ = ckpt.restore(s.state._replace(opt_state=skip), step)
        ckpt.close()
        params = state.params
        s.log(f"restored step {step} from {ckpt_dir}")
    # A checkpoint's row says what trained it (its saved config): method, whose setting, EchoRL.
    trained = f"{paper_table.run_label(cfg)}: {args.checkpoint} (step {step})" if ckpt_dir else None
    label = args.label or trained or cfg.model.path or "random init"
    t0 = time.perf_counter()
    s.eval_pipeline.set_state(s.eval_initial_state)
    texts: dict[int, list[str]] | None = {} if args.responses else None
    verdicts = grading.grade(s.eval_sample, s.decode_weights(s.eval_sample, params), s.eval_pipeline, s.eval_records, s.verifier, s.tokenizer,
                                k=args.k, rng=jax.random.key(args.seed), responses=texts)  # fmt: skip
    metrics = grading.summarize(verdicts, s.eval_records, args.k)
    scores = paper_table.benchmark_scores(metrics, args.k)
    table = paper_table.markdown_table([(label, scores)], args.k)
    result = {
        "label": label, "files": list(cfg.data.eval) if isinstance(cfg.data.eval, tuple) else [cfg.data.eval],
        "model_path": cfg.model.path, "checkpoint": ckpt_dir, "step": step, "k": args.k,
        "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": cfg.sampling.max_new_tokens,
        "seed": args.seed, "seconds": time.perf_counter() - t0, "metrics": metrics, "benchmarks": scores,
        "paper_row": {m: paper_table.summary_row(scores, m) for m in (f"avg@{args.k}", f"pass@{args.k}")},
        # record index (into the concatenated files) -> one 0/1 per sampled response
        "verdicts": {str(i): np.asarray(v, int).tolist() for i, v in sorted(verdicts.items())},
    }  # fmt: skip
    if jax.process_index() == 0:  # local paths or a bucket's (gs://...)
        storage.write_text(args.out, json.dumps(result, indent=1, allow_nan=True))
        storage.write_text(os.path.splitext(args.out)[0] + ".md", table)
        if texts is not None:
            write_responses(args.responses, s.eval_records, texts, verdicts)
        print(table)
    if hasattr(s.verifier, "close"):
        s.verifier.close()
    return result


def write_responses(path: str, records, texts: dict, verdicts: dict) -> None:
    """One JSON line per sampled response, with its record's prompt and answer."""
    from echorl_jax.trainer import storage

    lines = []
    for i in sorted(texts):
        rec = records[i]
        for j, (text, ok) in enumerate(zip(texts[i], verdicts[i])):
            lines.append(json.dumps({"index": i, "data_source": rec["data_source"], "prompt": rec["prompt"],
                                     "ground_truth": rec["ground_truth"], "sample": j, "response": text,
                                     "correct": bool(ok)}) + "\n")  # fmt: skip
    storage.write_text(path, "".join(lines))


def main(argv: list[str] | None = None) -> int:
    from echorl_jax import config as config_lib
    from echorl_jax.cli import exit_when_a_process_is_lost, maybe_init_distributed, user_errors

    args, rest = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        overrides = config_lib.parse_overrides(rest)
        # env / TPU-VM detection and --config.dist.*, before JAX starts; the run's config is built later
        dist = config_lib.build_config(None, {"dist": overrides.get("dist", {})}).dist
        maybe_init_distributed(dist)
        with exit_when_a_process_is_lost(dist):
            run(args, overrides)
    except user_errors() as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0

