"""Disaggregated rollouts (``mesh.sampler_devices``) vs colocated, on fake CPU devices: does the sampler decode
while the learner updates, and what does a step cost?

Each run is the trainer itself (``trainer/train.train``) for ``--steps`` RL steps of the built-in task with the
default's model (no warm start, no evaluation), on ``--devices`` CPU devices:

* **sync** (the peer): colocated, k = 0: sample on every device, then update on every device.
* **stream** colocated, k = 1 (``rl.stream_batches=2``): rollouts carried across steps, same devices.
* **split** (ours): ``--sampler-devices`` decode, the rest learn, k = 1 and ``rl.stream_batches=1``: the batch of
  step s + 1 decodes during step s's update with the weights pushed after step s - 1.

Reported from the runs' metrics (steps 1-2 compile and are left out): median seconds per step, update and
sampling seconds, and for the split run the busy intervals as the host sees them (learner: from the learning
step's start to its update's end; sampler: from the next round's dispatch to its decode's end), the fraction of
the step both are busy, the weights pushed per step and the push's seconds. A timeline of the last steps draws
both intervals. On a CPU host the fake devices share the cores, so two busy meshes slow each other: the overlap
shows the schedule, not the speed-up a multi-GPU host or a pod gets (bench/device_check.py's GPU row is that).

    python bench/disagg.py                       # 8 devices, 4 + 4, 12 steps
    python bench/disagg.py --devices 8 --sampler-devices 2 --steps 20 --json disagg.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--sampler-devices", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=16, help="rl.prompts_per_step")
    ap.add_argument("--group", type=int, default=8, help="rl.group_size")
    ap.add_argument("--new-tokens", type=int, default=48, help="sampling.max_new_tokens")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:  # before JAX starts
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from _common import REPO, machine_line, table, write_json  # noqa: F401  (REPO puts the repo on sys.path)

    from echorl_jax import config as config_lib
    from echorl_jax.trainer.metrics_log import read_jsonl
    from echorl_jax.trainer.train import train

    print(machine_line())
    base = config_lib.load_config_file(os.path.join(REPO, "configs", "default.py"))
    stream = {"rl": {"max_staleness": 1, "recompute_logp": True}, "objective": {"rollout_correction": "token_tis"}}
    runs = {
        "sync (peer)": {},
        "stream k=1": stream,
        f"split {args.sampler_devices}+{args.devices - args.sampler_devices} k=1": {
            "rl": {**stream["rl"], "stream_batches": 1}, "objective": stream["objective"],
            "mesh": {"sampler_devices": args.sampler_devices}},
    }  # fmt: skip
    results, rows_by_run = {}, {}
    for name, extra in runs.items():
        with tempfile.TemporaryDirectory() as work:
            over = {
                "sft": {"steps": 0}, "data": {"eval": ""},
                "train": {"steps": args.steps, "workdir": work, "eval_every": 0, "echo_grad_norm_every": 0,
                          "export_hf": False, "progress": False},
                "sampling": {"max_new_tokens": args.new_tokens},
                "mesh": {"cpu_devices": 0, **extra.get("mesh", {})},
                "rl": {"prompts_per_step": args.prompts, "group_size": args.group, **extra.get("rl", {})},
                "objective": extra.get("objective", {}),
            }  # fmt: skip
            train(config_lib.build_config(base, over))
            rows = [r for r in read_jsonl(os.path.join(work, "metrics.jsonl")) if r["kind"] == "train"][2:]
        rows_by_run[name] = rows
        med = lambda k: statistics.median(r.get(k, float("nan")) for r in rows)  # noqa: E731
        results[name] = {k: med(k) for k in ("time/step", "time/update", "time/sample", "time/sampler_busy",
                                             "time/both_busy_frac", "push/bytes", "time/push")}  # fmt: skip
    peer = results["sync (peer)"]["time/step"]
    print(f"\n{args.devices} CPU devices, {args.prompts} x {args.group} rollouts of <= {args.new_tokens} tokens, "
          f"default model; medians over steps 3-{args.steps}")  # fmt: skip
    header = ["run", "s/step", "vs sync", "update s", "sample s", "sampler busy s", "both busy", "push MB", "push s"]
    body = []
    for name, r in results.items():
        body.append([name, f"{r['time/step']:.3f}", f"{r['time/step'] / peer:.2f}x", f"{r['time/update']:.3f}",
                     f"{r['time/sample']:.3f}", _f(r["time/sampler_busy"]), _f(r["time/both_busy_frac"], "{:.0%}"),
                     _f(r["push/bytes"] / 1e6, "{:.2f}"), _f(r["time/push"])])  # fmt: skip
    print(table(header, body))
    split_name = list(runs)[-1]
    print(f"\ntimeline of {split_name} (one character = 2 % of the step; L learner busy, S sampler busy, B both):")
    for r in rows_by_run[split_name][-4:]:
        print(f"  step {r['step']:>3} {_timeline(r)}  {r['time/step']:.3f} s")
    write_json(args.json, {"machine": machine_line(), "args": vars(args), "runs": results})
    return 0


def _f(x, fmt="{:.3f}"):
    return "-" if x != x else fmt.format(x)


def _timeline(r, width: int = 50) -> str:
    """The learner's interval and the sampler's over the step's time (offsets from the metrics), one character
    per 1/width of it."""
    total, at = r["time/step"], r.get("time/learn_start", 0.0)  # the learning step starts once the batch is in
    learner = (at, at + r["time/update"])
    start = at + r.get("time/sampler_start", 0.0)
    sampler = (start, start + r.get("time/sampler_busy", 0.0))
    out = []
    for i in range(width):
        t = (i + 0.5) * total / width
        on_l, on_s = learner[0] <= t < learner[1], sampler[0] <= t < sampler[1]
        out.append("B" if on_l and on_s else "L" if on_l else "S" if on_s else ".")
    return "".join(out)


if __name__ == "__main__":
    sys.exit(main())
