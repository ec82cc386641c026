"""Memory planner: per-device bytes of every phase of a run, without building the model.

    python -m echorl_jax.plan --config CONFIG [--devices N] [--fit h100 [--split [S,...]]] [--config.k=v ...]

Ahead-of-time compiles the trainer's own programs for the configured mesh on abstract parameters (a
``model.path`` run, a directory or a Hub id, reads only its config.json) and prints per-device bytes:
parameters, optimizer state, the train step's temporaries, the KV cache, the sampler's decode copy,
and the peak of every phase -- the train step, the log-prob pass over the rollout batch (old /
reference log-probs, mismatch metrics), the echo diagnostic, the sampler (LUFFY: G - k rollouts per
prompt) and the held-out sampler -- and whether each named accelerator holds every phase. With
``--devices N`` the mesh is N fake CPU devices. ``--fit ACCEL`` searches the packing budget
(``rl.pack_rows_per_micro_batch``), the remat policy and the KV-cache budget
(``sampling.kv_cache_memory``) for the cheapest setting under which every phase fits ACCEL, and prints it
as overrides (planner/fit.py); with ``--split`` it does so for several sampler/learner splits
(``mesh.sampler_devices``) and recommends the one with the lowest predicted step time. Every plan ends with
its predicted step time, a roofline floor from the compiled programs' flops and bytes (planner/time.py):
a prediction, not a measurement. On CPU a flash-style attention backend is compiled as ``xla_chunked``
(planner/memory.py says why and what else differs from an accelerator's own compile).
"""

from __future__ import annotations

import argparse
import os
import sys

from echorl_jax.planner.context import abstract_opt_state, abstract_params, device_bytes, model_config  # noqa: F401
from echorl_jax.planner.fit import fit, fit_split, override_args
from echorl_jax.planner.memory import ACCELERATORS, GB, USABLE, Plan, plan, sampler_memory  # noqa: F401
from echorl_jax.planner.report import format_plan
from echorl_jax.planner.time import PEAKS


def _force_devices(n: int) -> None:
    """Fake CPU devices for the mesh; must run before jax initialises its backends."""
    if "jax" in sys.modules:
        import jax

        if len(jax.devices()) != n:
            raise SystemExit(f"--devices {n}: jax is already initialised with {len(jax.devices())} devices")
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


# The planner only compiles, never runs: skip XLA's backend (LLVM) optimisation, which does not change
# the buffers it assigns (a quarter of a 7B plan's compile time on CPU).
COMPILE_ONLY_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m echorl_jax.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a config file (configs/*.py)")
    ap.add_argument("--devices", type=int, default=0, help="plan for N fake CPU devices (no accelerator needed)")
    ap.add_argument("--fit", choices=sorted(ACCELERATORS),
                    help="search packing, remat and the KV-cache budget for the cheapest setting that fits this chip")
    ap.add_argument("--split", nargs="?", const="auto", metavar="S,...",
                    help="with --fit: also search sampler/learner splits (mesh.sampler_devices = each S; default: an "
                    "eighth, a quarter, a half and three quarters of the devices) and recommend the one with the "
                    "lowest predicted step time among those that fit")  # fmt: skip
    ap.add_argument("--json", metavar="PATH", help="also write the plan (and with --fit the setting found) as JSON")
    args, rest = ap.parse_known_args(argv)
    if args.split and not args.fit:
        ap.error("--split needs --fit ACCEL (the accelerator the split is timed and fitted for)")
    candidates = None
    if args.split and args.split != "auto":
        try:
            candidates = [int(x) for x in args.split.split(",")]
        except ValueError:
            ap.error(f"--split {args.split}: expected sampler device counts such as 2,4")
    if "jax" not in sys.modules:  # before jax initialises (a test's jax is already up: no matter)
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *COMPILE_ONLY_FLAGS]).strip()
    if args.devices:
        _force_devices(args.devices)

    from echorl_jax import cli, config as config_lib

    try:
        cfg = config_lib.build_config(config_lib.load_config_file(args.config), config_lib.parse_overrides(rest))
        if args.split:
            return _run_split(cfg, args.fit, candidates, args.json)
        return _run(cfg, args.fit, args.json)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except cli.user_errors() as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def _run(cfg, accel: str | None, json_path: str | None = None) -> int:
    if not accel:
        pl = plan(cfg)
        print(format_plan(pl))
        _write_json(json_path, pl)
        return 0
    label = ACCELERATORS[accel][0]
    print(f"searching for the cheapest setting that fits {label} (every phase within {USABLE:.0%} of memory):")
    found = fit(cfg, accel)
    if found.plan is None:
        print(f"nothing fits {label}: {found.why}")
        return 1
    print()
    print(format_plan(found.plan, accel))
    print(f"\nrecommended for {label}: {override_args(found.overrides)}")
    _write_json(json_path, found.plan, accel, found.overrides)
    return 0


def _run_split(cfg, accel: str, candidates: list[int] | None, json_path: str | None = None) -> int:
    from echorl_jax.planner.time import seconds

    label = ACCELERATORS[accel][0]
    print(f"searching each sampler/learner split for the cheapest setting that fits {label}:")
    best, trials = fit_split(cfg, accel, candidates=candidates)
    print(f"\nsplits on {label} (predicted step time: a roofline floor, not a measurement):")
    print("    sampler | learner | fits | sample   | learn    | push     | step     | setting found")
    for t in trials:
        name = "colocated" if not t.sampler_devices else str(t.sampler_devices)
        if t.time is None:
            print(f"  {name:>9s} |         | no   | {t.why}")
            continue
        learner = t.fit.plan.learner_devices  # colocated: every device
        cells = [seconds(x) for x in (t.time.sample, t.time.learn, t.time.push, t.time.total)]
        setting = override_args({k: v for k, v in t.fit.overrides.items() if k != "mesh.sampler_devices"})
        print(f"  {name:>9s} | {learner:>7d} | yes  | " + " | ".join(f"{c:8s}" for c in cells) + f" | {setting}")
    if best is None:
        print(f"no split fits {label}")
        return 1
    colocated = next((t for t in trials if not t.sampler_devices and t.time is not None), None)
    print()
    print(format_plan(best.fit.plan, accel))
    print(f"\nrecommended split for {label}: {override_args(best.fit.overrides)}")
    if colocated is not None and colocated.time.total <= best.time.total:
        print(f"(colocated is predicted faster: {seconds(colocated.time.total)} per step against "
              f"{seconds(best.time.total)}; {override_args(colocated.fit.overrides)})")  # fmt: skip
    _write_json(json_path, best.fit.plan, accel, best.fit.overrides)
    return 0


def _write_json(path: str | None, pl: Plan, accel: str | None = None, overrides: dict | None = None) -> None:
    """The plan in decimal GB per device, phase by phase (bench/plan_recipes.py reads it)."""
    if not path:
        return
    import json

    out = {"mesh": pl.mesh_shape, "accelerator": accel, "overrides": overrides or {}, "peak_gb": round(pl.peak / GB, 2),
           "phases": {p.name: round(p.peak / GB, 2) for p in pl.phases}, "decode_rows": pl.decode_rows,
           "decode_tensor_parallel": pl.decode_tp, "attention": pl.attention, "stand_in_for": pl.stand_in_for,
           "micro_batches": pl.micro_batches, "packed": pl.packed, "remat": pl.remat,
           "sampler_devices": pl.sampler_devices, "learner_devices": pl.learner_devices}  # fmt: skip
    if pl.work:  # seconds per RL step, a roofline floor (planner/time.py)
        out["predicted_step_s"] = {a: {k: round(v, 3) for k, v in pl.step_time(a)._asdict().items() if k != "layout"}
                                   for a in (PEAKS if accel is None else [accel])}  # fmt: skip
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
