"""Entry point: ``python -m echorl_jax.main [--config FILE] [--config.section.key=value ...]``.

With no ``--config`` the built-in default (configs/default.py's values) runs:
warm start + GRPO+EchoRL on the arithmetic task, CPU is enough.
"""

from __future__ import annotations

import argparse
import os
import sys

from echorl_jax import cli


def parse_args(argv: list[str]):
    from echorl_jax import config as config_lib

    parser = argparse.ArgumentParser(prog="python -m echorl_jax.main", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="Python config file with get_config() (default: built-in)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--compare", action="store_true", help="compare --methods (default GRPO, DAPO), each with and without EchoRL, instead")
    parser.add_argument("--seeds", default="0,1,2", help="RL seeds for --compare (comma-separated)")
    parser.add_argument("--methods", default="grpo,dapo",
                        help="methods for --compare, each run with and without EchoRL (comma-separated)")
    parser.add_argument("--parallel", type=int, default=0,
                        help="--compare: runs at once, as child processes (default: 8 on a GPU, else 1)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic XLA ops on a GPU (always on with --compare; CPU runs are deterministic)")
    args, rest = parser.parse_known_args(argv)
    values = config_lib.load_config_file(args.config) if args.config else cli.default_values()
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
        except cli.user_errors() as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        print(json.dumps(values, indent=2))
        return 0
    from echorl_jax import launch

    try:
        # Before anything starts JAX's backend (nothing above has): XLA reads XLA_FLAGS only then.
        if said := launch.set_cpu_devices(cfg.mesh.cpu_devices):
            print(f"[echorl] {said}", flush=True)
        platform = launch.deterministic_ops_here() if args.compare or args.deterministic else None
        cli.maybe_init_distributed(cfg.dist)
        parallel = compare_parallel(args.parallel, cfg.dist) if args.compare else 1
        methods = compare_methods(args.methods) if args.compare else ()
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except launch.RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from echorl_jax import compare
    from echorl_jax.trainer import report, train

    try:
        with cli.exit_when_a_process_is_lost(cfg.dist):
            if args.compare:
                seeds = tuple(int(x) for x in args.seeds.split(",") if x)
                compare.run(cfg, args.given, seeds=seeds, parallel=parallel, platform=platform, methods=methods)
                return 0
            result = train.train(cfg)
    except cli.user_errors() as e:  # bad paths, data rows, checkpoints, a changed config: a message, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except launch.RunFailed as e:  # a --compare run, with the end of its log
        print(f"error: {e}", file=sys.stderr)
        return 1
    report.write_report(cfg, result)
    return 0


def compare_methods(spec: str) -> tuple[str, ...]:
    """``--methods`` as preset names; an unknown or ``+echo`` name is a ConfigError (each runs ± EchoRL anyway)."""
    from echorl_jax import config as config_lib
    from echorl_jax.rl import methods as methods_lib

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

    if cli.distributed_args(dist, os.environ) is None:
        return requested
    if requested > 1:
        raise ConfigError(f"--parallel {requested}: runs cannot be child processes in a multi-process job "
                          "(TPU VM, SLURM or dist.*); leave --parallel out")  # fmt: skip
    return 1


if __name__ == "__main__":
    sys.exit(main())
