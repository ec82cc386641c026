"""The default job (configs/default.py) with streaming rollouts (docs/training.md, "Streaming rollouts"):
rollouts still running when a step's 16 groups are complete carry into the next step, refilled slots never
wait for a batch's longest rollout, and no token more than one policy version old reaches a loss. The
decoupled correction comes with it: recomputed log-probs as the PPO ratio's proximal policy and the
truncated importance weight proximal/behaviour (AReaL's decoupled PPO). Same warm start, task and budget.
Measured on the previous default (400-step warm start without slips, 500 RL steps; RESULTS.md, "Streaming
rollouts", 2-core Xeon, 3 seeds): held-out gain +7.6 on average against the synchronous default's +6.1, but
0.92 s per RL step against 0.61 s: this task's rollouts are too short for the
saved decode steps to outweigh streaming's fixed costs on a CPU (bench/README.md shows where it wins).

    python -m echorl_jax.main --config configs/default_stream.py
"""

import os
import runpy

_default = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def get_config():
    cfg = _default["get_config"]()
    cfg["rl"] = {**cfg["rl"], "max_staleness": 1, "recompute_logp": True}
    cfg["objective"] = {**cfg["objective"], "rollout_correction": "token_tis"}
    cfg["train"] = {**cfg["train"], "workdir": "runs/default_stream"}
    return cfg
