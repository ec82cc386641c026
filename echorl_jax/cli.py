"""What every command-line tool shares: the tools by name, user errors, the default config, and the
multi-process start (``jax.distributed``) that must come before JAX touches a device.

Every tool is ``python -m echorl_jax.TOOL`` (or ``echorl-jax TOOL`` once installed):

    main            train (the default job, a config file, --compare)
    evaluate        benchmark evaluation (avg@k / pass@k per data source, the paper's table)
    plan            per-device memory of a config, and the cheapest setting that fits an accelerator
    data_prep       Hugging Face exports -> verl parquet (the paper's train and eval sets)
    analyze_steps   step-entropy analysis of verified solutions
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import os
import sys
from typing import Mapping

# name -> module whose main(argv) -> exit code runs it
TOOLS = {
    "main": "echorl_jax.main",
    "evaluate": "echorl_jax.evaluation.benchmark",
    "plan": "echorl_jax.plan",
    "data_prep": "echorl_jax.data.prep",
    "analyze_steps": "echorl_jax.evaluation.step_entropy",
}
ALIASES = {"train": "main", "data-prep": "data_prep", "analyze-steps": "analyze_steps", "prep": "data_prep"}


def run_tool(name: str, argv: list[str]) -> int:
    return importlib.import_module(TOOLS[name]).main(argv)


def dispatch(argv: list[str] | None = None) -> int:
    """``echorl-jax [TOOL] ARGS``: a tool by name, else training (``echorl-jax --config FILE`` trains)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n", 1)[1].rstrip())
        print("\nWith no TOOL (or an option first), echorl-jax trains: echorl-jax --config FILE == python -m echorl_jax.main --config FILE")
        return 0
    if argv and not argv[0].startswith("-"):
        name = ALIASES.get(argv[0], argv[0])
        if name not in TOOLS:
            print(f"echorl-jax: unknown tool {argv[0]!r}; tools: {', '.join(TOOLS)}", file=sys.stderr)
            return 2
        return run_tool(name, argv[1:])
    return run_tool("main", argv)


def console() -> None:
    """The ``echorl-jax`` console script."""
    sys.exit(dispatch())


def default_values() -> dict:
    from echorl_jax import config as config_lib

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "configs", "default.py")
    return config_lib.load_config_file(path) if os.path.isfile(path) else {}


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
    joins here before JAX touches a device. A process that sends no heartbeat for ``dist.heartbeat_timeout_s``
    is declared dead and JAX stops the others (``exit_when_a_process_is_lost`` names it first when it can)."""
    kwargs = distributed_args(dist, os.environ)
    if kwargs is not None:
        import jax

        jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=dist.heartbeat_timeout_s,
                                   initialization_timeout=dist.init_timeout_s)  # fmt: skip
        if jax.process_count() > 1 and jax.process_index() == 0:
            print(f"[echorl] {jax.process_count()} processes, {jax.device_count()} devices", flush=True)


def lost_processes(wait_s: float) -> list[int] | None:
    """The processes ``jax.distributed`` no longer counts as alive, ``[0]`` when its coordination service (in
    process 0) does not answer, or None when all are alive or no answer came within ``wait_s``. The service
    answers once every live process has asked or a silent one has missed its heartbeat deadline."""
    import threading

    import jax
    from jax._src import distributed  # the client JAX keeps; get_live_nodes has no public wrapper

    n = jax.process_count()
    client = getattr(distributed.global_state, "client", None)
    if client is None or not hasattr(client, "get_live_nodes"):
        return None
    answer, error = [], []

    def ask():
        try:
            answer.append(client.get_live_nodes(list(range(n))))
        except Exception as e:  # noqa: BLE001  (the service is gone)
            error.append(e)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout=wait_s)
    if error:
        return [0] if jax.process_index() != 0 else None
    lost = sorted(set(range(n)) - set(answer[0])) if answer else []
    return lost or None


@contextlib.contextmanager
def exit_when_a_process_is_lost(dist):
    """Multi-process: an error from a collective whose peer died becomes one line naming the lost process(es)
    and exit code 3 at once, instead of a traceback and JAX's shutdown barrier waiting on the dead process.
    Rerunning every process resumes from the last checkpoint. Errors while all processes live pass through."""
    try:
        yield
    except user_errors():
        raise
    except Exception as e:  # noqa: BLE001  (JaxRuntimeError from gloo/NCCL, anything a lost peer causes)
        import jax

        if jax.process_count() > 1:
            lost = lost_processes(dist.heartbeat_timeout_s + 5.0)
            if lost:
                who = " (the coordinator)" if lost == [0] else ""
                print(f"error: lost process(es) {lost}{who} of {jax.process_count()} (jax.distributed: no heartbeat;"
                      f" dist.heartbeat_timeout_s={dist.heartbeat_timeout_s}): {type(e).__name__}: {str(e)[:300]}\n"
                      "Rerun every process to resume from the last checkpoint.", file=sys.stderr, flush=True)
                os._exit(3)  # not sys.exit: JAX's shutdown would wait for the dead process first
        raise


def user_errors() -> tuple[type[BaseException], ...]:
    from echorl_jax.config import ConfigError
    from echorl_jax.data.formats import DataError
    from echorl_jax.models.config import ModelConfigError
    from echorl_jax.rewards.custom import RewardFnError
    from echorl_jax.trainer.checkpoint import CheckpointError

    errors: list[type[BaseException]] = [ConfigError, DataError, ModelConfigError, CheckpointError, FileNotFoundError,
                                          RewardFnError]  # a custom reward that returned a bad value
    from echorl_jax.models.hf import CheckpointError as HFCheckpointError

    errors.append(HFCheckpointError)
    return tuple(errors)
