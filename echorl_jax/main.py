"""Entry point: ``python -m echorl_jax.main [--config FILE] [--config.section.key=value ...]``.

With no ``--config`` the built-in default (configs/default.py's values) runs:
warm start + GRPO+EchoRL on the arithmetic task, CPU is enough.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str]):
    from echorl_jax import config as config_lib

    parser = argparse.ArgumentParser(prog="echorl-jax", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="Python config file with get_config() (default: built-in)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--compare", action="store_true", help="run the GRPO/DAPO ± EchoRL comparison instead")
    parser.add_argument("--seeds", default="0,1,2", help="RL seeds for --compare (comma-separated)")
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
        from echorl_jax.models.config import load_hf_config
        from echorl_jax.models.hub import resolve_model_dir

        m = cfg.model
        arch = load_hf_config(resolve_model_dir(m.path), param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat)
        values["model"].update(dataclasses.asdict(arch))
    return values


def maybe_init_distributed() -> None:
    # Multi-host (TPU pods, multi-node GPU): every host runs this same program.
    if any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID")):
        import jax

        if os.environ.get("ECHORL_NO_DISTRIBUTED") != "1":
            jax.distributed.initialize()


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
    maybe_init_distributed()
    from echorl_jax import compare, report, train

    try:
        if args.compare:
            compare.run(cfg, args.given, seeds=tuple(int(x) for x in args.seeds.split(",") if x))
            return 0
        result = train.train(cfg)
    except _user_errors() as e:  # bad paths, data rows, checkpoints, a changed config: a message, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    report.write_report(cfg, result)
    return 0


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
