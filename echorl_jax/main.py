"""Entry point: ``python -m echorl_jax.main [--config FILE] [--config.section.key=value ...]``.

With no ``--config`` the built-in default (configs/default.py's values) runs:
warm start + GRPO+EchoRL on the arithmetic task, CPU is enough.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Mapping


def parse_args(argv: list[str]):
    from echorl_jax import config as config_lib

    parser = argparse.ArgumentParser(prog="echorl-jax", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="Python config file with get_config() (default: built-in)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--compare", action="store_true", help="run the GRPO/DAPO ± EchoRL comparison instead")
    parser.add_argument("--seeds", default="0,1,2", help="RL seeds for --compare (comma-separated)")
    parser.add_argument("--methods", default="grpo,dapo",
                        help="methods for --compare, each run with and without EchoRL (comma-separated)")
    parser.add_argument("--parallel", type=int, default=0,
                        help="--compare: runs at once, as child processes (default: 8 on a GPU, else 1)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic XLA ops on a GPU (always on with --compare; CPU runs are deterministic)")
    args, rest = parser.parse_known_args(argv)
    values = config_lib.load_config_file(args.config) if args.config else default_values()
    overrides = config_lib.parse_overrides(rest)
    if not args.config and overrides.get("model", {}).get("path"):
        # The built-in default with your own model: its architecture comes from model.path/config.json.
        arch = config_lib.architecture_fields()
        values = dict(values, model={k: v for k, v in values.get("model", {}).items() if k not in arch})
    given = config_lib.merge_given(values, overrides)
    if args.config and "workdir" not in given.get("train", {}):
        # One run per workdir: a config file's runs do not land in (and resume) the default's.
        stem = os.path.splitext(os.path.basename(args.config))[0]
        given = config_lib.merge_given(given, {"train": {"workdir": os.path.join("runs", stem)}})
    args.given = given
    return args, config_lib.build_config(given)


def default_values() -> dict:
    from echorl_jax import config as config_lib

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "configs", "default.py")
    return config_lib.load_config_file(path) if os.path.isfile(path) else {}


def resolved_config_dict(cfg) -> dict:
    """The config as a dict, with the architecture read from ``model.path/config.json`` when set."""
    import dataclasses

    from echorl_jax import config as config_lib

    values = config_lib.to_dict(cfg)
    if cfg.model.path:
        from echorl_jax.models.config import load_hf_config, numerics
        from echorl_jax.models.hub import resolve_model_dir

        m = cfg.model
        arch = load_hf_config(resolve_model_dir(m.path), **numerics(m), **config_lib.context_overrides(m))
        values["model"].update(dataclasses.asdict(arch))
    return values


def distributed_args(dist, env: Mapping[str, str]) -> dict | None:
    """``jax.distributed.initialize`` keyword arguments for this run, or None for a single process.

    Explicit settings (``dist.*`` or env JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)
    must be complete. Otherwise ``dist.initialize="auto"`` initializes with JAX's own detection (``{}``) on
    a Cloud TPU VM or in a SLURM job, where every host runs this same program.
    """
    from echorl_jax.config import ConfigError

    if dist.initialize == "never":
        return None
    given = {
        "coordinator_address": dist.coordinator or env.get("JAX_COORDINATOR_ADDRESS", ""),
        "num_processes": dist.num_processes or int(env.get("JAX_NUM_PROCESSES", "0") or 0),
        "process_id": dist.process_id if dist.process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1") or -1),
    }
    unset = {"coordinator_address": "", "num_processes": 0, "process_id": -1}
    if any(given[k] != unset[k] for k in given):
        missing = [k for k in given if given[k] == unset[k]]
        if missing:
            names = {"coordinator_address": "dist.coordinator (JAX_COORDINATOR_ADDRESS)",
                     "num_processes": "dist.num_processes (JAX_NUM_PROCESSES)",
                     "process_id": "dist.process_id (JAX_PROCESS_ID)"}  # fmt: skip
            raise ConfigError(f"multi-process settings are incomplete: {given}; also set "
                              + ", ".join(names[k] for k in missing))
        return given
    if dist.initialize == "always" or _on_tpu_vm() or "SLURM_JOB_ID" in env:
        return {}
    return None


def _on_tpu_vm() -> bool:
    """A Google TPU on the PCI bus (how libtpu itself detects a Cloud TPU VM), without touching JAX."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == "0x1ae0":
                    return True
        except OSError:
            pass
    return False


def maybe_init_distributed(dist) -> None:
    """Multi-host (TPU pods, multi-node GPU, the localhost tests): every process runs this same program and
    joins here before JAX touches a device."""
    kwargs = distributed_args(dist, os.environ)
    if kwargs is not None:
        import jax

        jax.distributed.initialize(**kwargs)
        if jax.process_count() > 1 and jax.process_index() == 0:
            print(f"[echorl] {jax.process_count()} processes, {jax.device_count()} devices", flush=True)


def main(argv: list[str] | None = None) -> int:
    from echorl_jax import config as config_lib

    try:
        args, cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import json

        try:
            values = resolved_config_dict(cfg)
        except _user_errors() as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        print(json.dumps(values, indent=2))
        return 0
    from echorl_jax import launch

    try:
        # Before anything starts JAX's backend (nothing above has): XLA reads XLA_FLAGS only then.
        platform = launch.deterministic_ops_here() if args.compare or args.deterministic else None
        maybe_init_distributed(cfg.dist)
        parallel = compare_parallel(args.parallel, cfg.dist) if args.compare else 1
        methods = compare_methods(args.methods) if args.compare else ()
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except launch.RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from echorl_jax import compare, report, train

    try:
        if args.compare:
            seeds = tuple(int(x) for x in args.seeds.split(",") if x)
            compare.run(cfg, args.given, seeds=seeds, parallel=parallel, platform=platform, methods=methods)
            return 0
        result = train.train(cfg)
    except _user_errors() as e:  # bad paths, data rows, checkpoints, a changed config: a message, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except launch.RunFailed as e:  # a --compare run, with the end of its log
        print(f"error: {e}", file=sys.stderr)
        return 1
    report.write_report(cfg, result)
    return 0


def compare_methods(spec: str) -> tuple[str, ...]:
    """``--methods`` as preset names; an unknown or ``+echo`` name is a ConfigError (each runs ± EchoRL anyway)."""
    from echorl_jax import config as config_lib, methods as methods_lib

    names = tuple(x.strip() for x in spec.split(",") if x.strip())
    bad = [n for n in names if n not in methods_lib.list_methods()]
    if not names or bad:
        raise config_lib.ConfigError(f"--methods={spec!r}: expected comma-separated methods from "
                                     f"{methods_lib.list_methods()} (each runs with and without EchoRL)")
    return names


def compare_parallel(requested: int, dist) -> int:
    """``--parallel`` for this process: 1 in a multi-process job (TPU VM, SLURM, jax.distributed), where
    every process runs the same runs together; otherwise as requested (0: ``compare.run`` decides)."""
    from echorl_jax.config import ConfigError

    if distributed_args(dist, os.environ) is None:
        return requested
    if requested > 1:
        raise ConfigError(f"--parallel {requested}: runs cannot be child processes in a multi-process job "
                          "(TPU VM, SLURM or dist.*); leave --parallel out")  # fmt: skip
    return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    from echorl_jax.checkpoint import CheckpointError
    from echorl_jax.config import ConfigError
    from echorl_jax.data_formats import DataError
    from echorl_jax.models.config import ModelConfigError

    errors: list[type[BaseException]] = [ConfigError, DataError, ModelConfigError, CheckpointError, FileNotFoundError]
    from echorl_jax.models.hf import CheckpointError as HFCheckpointError

    errors.append(HFCheckpointError)
    return tuple(errors)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
