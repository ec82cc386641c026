"""One device check: the GPU figures of issue 19 item 6 in one markdown table, in <= 8 minutes on one H100/H200.

    bash bench/device_check.sh                 # on the GPU host (installs .whl/*.whl first, see bench/README.md)
    python bench/device_check.py --quick       # tiny shapes, any CPU: checks that every part runs (a test does)

Every measurement is one of the bench scripts, run as its own process (a fresh JAX and CUDA context
each, a timeout each) with ``--json``; a part that fails or times out still gives its row, saying so
with the last line of its output. Rows (Qwen2.5-0.5B shape, random weights, bf16; nothing downloaded):

  1   sampler at the 0.5B preset vs transformers ``generate`` (sampler.py --preset qwen2.5-0.5b:
      256 prompts x (128 + 256 new tokens), temperature 1); target: ours >= 200,000 tok/s.
  2   long-tail sampler workload, slot refill vs one row per rollout (sampler.py --workload longtail:
      256 rollouts = 32 prompts x G 8, P 128, T 512, log-normal lengths with median T/8, 64 slots, live
      key blocks); target (issue 10): refill >= 70 % of the uniform-length figure at the same shape.
  3a  train step at the preset vs eager PyTorch (train_step.py --preset qwen2.5-0.5b: 16 x 1,024 tokens,
      GRPO + echo loss, AdamW; ours cudnn attention, remat none); target: <= 0.118 s/step.
  3b  the same step of ours vs torch.compile'd PyTorch (the peer timed alone: train_step.py --skip-ours
      --torch-compile); target: <= 0.118 s/step, i.e. >= 1.1x the compiled peer.
  3c-3h  train step packed vs padded (packing.py --preset qwen2.5-0.5b: 16 rollouts, P 128-256 + log-normal
      responses, median T/5, cap T 768, 4 rows per micro-batch) for attention cudnn, xla_chunked, xla x remat
      none, full.
  3i  splash attention: skipped on a GPU (Pallas splash is TPU-only).
  4   the planner's predicted train-step peak (planner.memory.learner_memory, phase "train step", compiled
      on this device for 3a's config) vs JAX's peak_bytes_in_use after 3a's steps (3a's fresh process);
      and the planner's roofline floor for that step (planner/time.py, the device's peak figures) vs 3a's
      measured s/step (shown as the share of peak the step reaches).
  5   streaming rollouts vs synchronous slot refill (streaming.py, Qwen2.5-0.5B's shape, bf16: 256 rollouts
      = 64 prompts x G 4 per RL step, P 128, T 512, log-normal lengths, 64 slots, 8 RL steps, k = 1);
      target (issue 30): >= 90 % slot occupancy.

Estimated time on an H100/H200 host (16 cores), from the shapes: each process ~6 s to start, building and
saving the random 0.5B checkpoint ~8 s, each XLA compile of the 0.5B train step or sampler ~15-20 s:

  part            what runs                                                     estimate
  sampler         ckpt + 1 compile + 2 x 256 decode steps + HF generate (~15 s)      55 s
  longtail        ckpt + 2 compiles + uniform (2 x 2,048 steps), plain, refill      70 s
  train_eager     ckpt + torch eager 12 steps + 1 compile + 12 steps                45 s
  train_compiled  torch model + torch.compile (~45 s) + 12 steps                    65 s
  plan            1 compile (no run)                                                25 s
  pack x 6        random init + 2 compiles + 4 x 2 steps, per backend x remat    6 x 33 s
  streaming       random init + 4 compiles + 2 runs x 8 RL steps of <= 512 decodes  60 s
  total (+ ~5 s to probe the device)                                              518 s

Parts run in that order (the grid: cudnn, xla_chunked, xla; none before full). A part starts only if its
estimate fits in what is left of ``--budget-s`` (default 470 s from the driver's start: with the wrapper's
install, 8 minutes), and is stopped at twice its estimate + 30 s or at the budget, whichever comes first;
a part left out or stopped says so in its row. The table ends with each part's estimate and wall time:
correct the estimates here from the first GPU run.

Output: the table on stdout and in ``--out`` (default ``$OUT/device_check.md`` where ``$OUT`` is set,
else ``./device_check.md``); beside it ``device_check.log`` (every part's output) and
``device_check.json`` (every part's results). Put the table in bench/README.md ("Device check"). The exit
status is 1 when a part failed or timed out (its row says why), else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
PRESET = "qwen2.5-0.5b"
TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--mlp", "128", "--vocab", "256"]
GRID = [(attn, remat) for attn in ("cudnn", "xla_chunked", "xla") for remat in ("none", "full")]
QUICK_GRID = [("xla", "none"), ("xla_chunked", "full")]  # --quick: both backends and policies, two processes
SAMPLER_TARGET_TPS = 200_000
TRAIN_TARGET_S = 0.118
REFILL_TARGET = 0.70
STREAM_TARGET = 0.90  # slot occupancy (issue 30)
QWEN05 = ["--hidden", "896", "--layers", "24", "--heads", "14", "--kv-heads", "2", "--mlp", "4864", "--vocab", "151936"]


@dataclasses.dataclass
class Part:
    key: str
    argv: list[str]  # after the interpreter
    est_s: float  # on an H100/H200 (the module docstring)
    what: str  # the row's description
    skip: str = ""  # why it does not run (a row still says so)


@dataclasses.dataclass
class Outcome:
    data: dict | None = None  # the part's --json
    error: str = ""  # "" = ran to the end
    wall_s: float = 0.0
    skipped: str = ""


def parts(quick: bool) -> list[Part]:
    """The processes of one check, in the order they run."""
    py = lambda script, *a: [os.path.join(BENCH, script), *a]  # noqa: E731
    if quick:
        model = "tiny Qwen2 (hidden 64, 2 layers, vocab 256), fp32"
        sampler = ["--batch", "8", "--prompt-len", "8", "--new-tokens", "8", *TINY]
        longtail = ["--workload", "longtail", "--batch", "16", "--group", "4", "--prompt-len", "8", "--new-tokens",
                    "32", "--slots", "4", "--rounds", "1", *TINY]  # fmt: skip
        train = ["--batch", "8", "--seq", "64", "--dtype", "fp32", "--attention", "xla", "--remat", "none",
                 "--steps", "2", "--rounds", "1", "--warmup", "1", *TINY]  # fmt: skip
        pack = ["--rows", "16", "--group", "8", "--prompt", "8", "--response", "56", "--rows-per-micro-batch", "2",
                "--model-type", "qwen2", "--reps", "1", *TINY]  # fmt: skip
        shapes = dict(b=8, p=8, t=8, lb=16, lg=4, lp=8, lt=32, slots=4, tb=8, ts=64, tp=16, tt=48, attn="xla",
                      rows=16, pp=8, pt=56, k=2)  # fmt: skip
        est = dict(sampler=60, longtail=80, train_eager=90, train_compiled=150, plan=60, pack=100, streaming=120)  # a busy 2-core CPU
        stream = ["--batch", "16", "--group", "4", "--prompt-len", "8", "--new-tokens", "32", "--slots", "4",
                  "--steps", "3", "--staleness", "1", *TINY]  # fmt: skip
    else:
        model = "Qwen2.5-0.5B shape, bf16"
        sampler = ["--preset", PRESET]
        longtail = ["--preset", PRESET, "--workload", "longtail", "--batch", "256", "--group", "8", "--new-tokens",
                    "512", "--slots", "64", "--rounds", "1"]  # fmt: skip
        train = ["--preset", PRESET, "--attention", "cudnn", "--remat", "none", "--steps", "5", "--rounds", "2",
                 "--warmup", "2"]  # fmt: skip
        pack = ["--preset", PRESET, "--reps", "3"]
        shapes = dict(b=256, p=128, t=256, lb=256, lg=8, lp=128, lt=512, slots=64, tb=16, ts=1024, tp=256, tt=768,
                      attn="cudnn", rows=16, pp=256, pt=768, k=4)  # fmt: skip
        est = dict(sampler=55, longtail=70, train_eager=45, train_compiled=65, plan=25, pack=33, streaming=60)
        stream = ["--batch", "256", "--group", "4", "--prompt-len", "128", "--new-tokens", "512", "--slots", "64",
                  "--steps", "8", "--staleness", "1", "--dtype", "bfloat16", "--tied", "1", *QWEN05]  # fmt: skip
    z = shapes
    step = (f"train step, {model}, {z['tb']} x {z['ts']} tokens ({z['tp']} + {z['tt']}), GRPO + echo loss, AdamW; "
            f"ours: attention {z['attn']}, remat none")  # fmt: skip
    out = [
        Part("sampler", py("sampler.py", *sampler), est["sampler"],
             f"sampler vs transformers `generate`, {model}, {z['b']} prompts x ({z['p']} + {z['t']} new tokens), "
             f"temperature 1"),
        Part("longtail", py("sampler.py", *longtail, "--runs", "uniform,plain-live,refill-live"), est["longtail"],
             f"long-tail sampler, {model}: {z['lb']} rollouts ({z['lb'] // z['lg']} prompts x G {z['lg']}), "
             f"P {z['lp']}, T {z['lt']}, log-normal lengths (median T/8), {z['slots']} slots: slot refill vs one row "
             f"per rollout (plain), live key blocks"),
        Part("train_eager", py("train_step.py", *train), est["train_eager"], f"{step} vs PyTorch eager"),
        Part("train_compiled", py("train_step.py", *train, "--skip-ours", "--torch-compile"), est["train_compiled"],
             f"{step} vs torch.compile (the peer timed alone)"),
        Part("plan", [os.path.abspath(__file__), "--plan-worker", "--", *train], est["plan"],
             "memory: the planner's train-step peak (learner_memory, compiled on this device for 3a's config) vs "
             "JAX peak_bytes_in_use after 3a's steps (3a's fresh process)"),
    ]  # fmt: skip
    for i, (attn, remat) in enumerate(GRID):
        skip = ""
        if quick:
            skip = "cuDNN attention needs a GPU" if attn == "cudnn" else (
                "" if (attn, remat) in QUICK_GRID else "--quick runs two of the grid's combinations")  # fmt: skip
        workload = (f"train step packed vs padded, {model}, {z['rows']} rollouts (P {z['pp'] // 2}-{z['pp']}, "
                    f"T log-normal median {z['pt'] // 5}, cap {z['pt']}), {z['k']} rows of {z['pp'] + z['pt']} "
                    f"per micro-batch; " if i == 0 else "as 3c; ")  # fmt: skip
        out.append(Part(f"pack_{attn}_{remat}", py("packing.py", *pack, "--attention", attn, "--remat", remat),
                        est["pack"], f"{workload}attention {attn}, remat {remat}", skip))  # fmt: skip
    out.append(Part("streaming", py("streaming.py", *stream), est["streaming"],
                    f"streaming rollouts (k = 1, a pool of 2 batches) vs synchronous slot refill, {model}: long-tail "
                    f"lengths, the same prompts and lengths both ways, same weights every step"))  # fmt: skip
    return out


def last_line(text: str) -> str:
    """The error's last line: the last non-empty line of a part's output, progress bars left out."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Writing model shards", "Loading"))] or lines
    return (lines[-1] if lines else "no output")[:300]


def run_part(part: Part, tmp: str, deadline: float, log) -> Outcome:
    if part.skip:
        return Outcome(skipped=part.skip)
    left = deadline - time.monotonic()
    if left < part.est_s:
        return Outcome(skipped=f"time budget: {left:.0f} s left, the part needs ~{part.est_s:.0f} s")
    timeout = min(2 * part.est_s + 30, left)
    json_path = os.path.join(tmp, f"{part.key}.json")
    cmd = [sys.executable, *part.argv, "--json", json_path]
    if "--plan-worker" in part.argv:  # the worker's own --json goes before its "--"
        i = cmd.index("--")
        cmd = [*cmd[:i], "--json", json_path, *cmd[i:-2]]
    t0 = time.monotonic()
    shown = " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd[1:])
    print(f"[device_check] {part.key}: {shown} (estimate {part.est_s:.0f} s, timeout {timeout:.0f} s)", flush=True)
    # Its own process group, so that a timeout also ends what the part started (torch.compile's workers).
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
        error = "" if proc.returncode == 0 else f"exit {proc.returncode}: {last_line(output)}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        error = f"timed out after {timeout:.0f} s: {last_line(output)}"
    wall = time.monotonic() - t0
    log.write(f"\n===== {part.key} ({wall:.1f} s): {' '.join(cmd[1:])}\n{output}\n")
    log.flush()
    data = None
    if os.path.exists(json_path):
        with open(json_path) as f:
            data = json.load(f)
    if data is None and not error:
        error = f"wrote no results to {json_path}: {last_line(output)}"
    print(f"[device_check] {part.key}: {'ok' if not error else 'FAILED: ' + error} ({wall:.1f} s)", flush=True)
    return Outcome(data, error, wall)


# ----------------------------------------------------------------------------- the table

Row = list  # [id, what, ours, peer, ratio, target, result]


def _n(x, digits=0) -> str:
    return f"{x:,.{digits}f}"


def _gib(x) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def _status(o: Outcome, what: str = "") -> str:
    if o.skipped:
        return f"skipped: {o.skipped}"
    return f"FAILED{' (' + what + ')' if what else ''}: {o.error}" if o.error else ""


def _judge(ok: bool | None, on_gpu: bool) -> str:
    if not on_gpu:
        return "not judged (no GPU)"
    return "met" if ok else "missed"


def rows(todo: list[Part], out: dict[str, Outcome], on_gpu: bool) -> list[Row]:
    """One row per figure (rows 1-4 of the module docstring), from the parts' results."""
    what = {p.key: p.what for p in todo}
    table: list[Row] = []

    o, d = out["sampler"], out["sampler"].data or {}
    target = f"ours >= {_n(SAMPLER_TARGET_TPS)} tok/s"
    if o.error or o.skipped or not d.get("peer"):
        table.append(["1", what["sampler"], "-", "-", "-", target, _status(o) or "FAILED: no peer result"])
    else:
        ours, peer = d["ours"]["tokens_per_s"], d["peer"]["tokens_per_s"]
        table.append(["1", what["sampler"], f"{_n(ours)} tok/s ({d['ours']['ms_per_step']:.2f} ms/step)",
                      f"generate {_n(peer)} tok/s", f"{ours / peer:.2f}x ours/peer", target,
                      _judge(ours >= SAMPLER_TARGET_TPS, on_gpu)])  # fmt: skip

    o, d = out["longtail"], out["longtail"].data or {}
    target = f"refill >= {REFILL_TARGET:.0%} of uniform (issue 10; stated there at 1,024 rollouts, T 4,096, 256 slots)"
    runs = d.get("runs", {})
    need = ("long-tail refill, live blocks", "long-tail plain, live blocks", "uniform")
    if o.error or o.skipped or not all(k in runs for k in need):
        table.append(["2", what["longtail"], "-", "-", "-", target, _status(o) or "FAILED: missing runs"])
    else:
        refill, plain, uni = (runs[k]["useful_tokens_per_s"] for k in need)
        table.append(["2", what["longtail"],
                      f"refill {_n(refill)} useful tok/s ({runs[need[0]]['occupancy']:.0%} slot occupancy)",
                      f"plain {_n(plain)} useful tok/s", f"{refill / plain:.2f}x refill/plain", target,
                      f"{_judge(refill >= REFILL_TARGET * uni, on_gpu)}: refill/uniform {refill / uni:.2f} "
                      f"(uniform {_n(uni)} tok/s)"])  # fmt: skip

    oe, de = out["train_eager"], out["train_eager"].data or {}
    ours = de.get("ours") or {}
    ours_txt = "-"
    if "s_per_step" in ours:
        ours_txt = f"{ours['s_per_step']:.4f} s/step ({ours['tflops']:.1f} model TFLOP/s, compile {ours['compile_s']:.0f} s)"
    for rid, key, label in (("3a", "train_eager", "eager"), ("3b", "train_compiled", "torch.compile")):
        o = out[key]
        peer = (o.data or {}).get("peer") or {}
        target = f"<= {TRAIN_TARGET_S} s/step" + (" (>= 1.1x the compiled peer)" if rid == "3b" else "")
        if "s_per_step" not in ours or "s_per_step" not in peer:
            status = "" if "s_per_step" in ours else _status(oe, "ours")
            status = status or _status(o, f"{label} peer") or "FAILED: no result"
            table.append([rid, what[key], ours_txt, "-", "-", target, status])
            continue
        compiled = f", compile {peer['compile_s']:.0f} s" if peer.get("compile_s") is not None else ""
        ratio = peer["s_per_step"] / ours["s_per_step"]
        ok = ours["s_per_step"] <= TRAIN_TARGET_S and (rid == "3a" or ratio >= 1.1)
        table.append([rid, what[key], ours_txt, f"{peer['s_per_step']:.4f} s/step ({peer['name']}{compiled})",
                      f"{ratio:.2f}x peer/ours", target, _judge(ok, on_gpu)])  # fmt: skip

    for i, (attn, remat) in enumerate(GRID):
        key = f"pack_{attn}_{remat}"
        o, d = out[key], out[key].data or {}
        rid = f"3{'cdefgh'[i]}"
        if o.error or o.skipped or "packed" not in d:
            table.append([rid, what[key], "-", "-", "-", "-", _status(o) or "FAILED: no result"])
            continue
        pk, pd = d["packed"], d["padded"]
        table.append([rid, what[key],
                      f"packed {pk['s_per_step']:.4f} s/step ({pk['micro_batches']} micro-batches, fill {pk['fill']:.0%})",
                      f"padded {pd['s_per_step']:.4f} s/step ({pd['micro_batches']} micro-batches)",
                      f"{d['ratio_packed_over_padded']:.2f}x padded/packed", "-", "ok"])  # fmt: skip
    table.append(["3i", "train step, attention splash", "-", "-", "-", "-",
                  "skipped: Pallas splash attention runs on TPU only"])  # fmt: skip

    table.append(plan_row(what, out))
    table.append(streaming_row(what, out["streaming"], on_gpu))
    return table


def accel_of(device_kind: str) -> str | None:
    """The planner's accelerator key (planner/time.PEAKS) for a JAX ``device_kind``, or None."""
    kind = device_kind.lower()
    for key, names in (("h200", ("h200",)), ("h100", ("h100",)), ("a100", ("a100",)), ("v5e", ("v5 lite", "v5e")),
                       ("v5p", ("v5p",)), ("v6e", ("v6 lite", "v6e"))):  # fmt: skip
        if any(n in kind for n in names):
            return key
    return None


def plan_row(what: dict, out: dict[str, Outcome]) -> Row:
    """Row 4: the planner's prediction against 3a's measured peak."""
    oe, de = out["train_eager"], out["train_eager"].data or {}
    ours = de.get("ours") or {}
    op, dp = out["plan"], out["plan"].data or {}
    mem = ours.get("device_memory") or {}
    pred = dp.get("predicted_peak_bytes")
    after = mem.get("after_steps") or {}
    if pred is None:
        return ["4", what["plan"], "-", "-", "-", "-", _status(op, "planner") or "FAILED: no prediction"]
    pred_txt = f"predicted {_gib(pred)} (attention {dp.get('attention')})"
    if dp.get("predicted_step_s") and "s_per_step" in ours:  # time: the roofline floor vs 3a's measured step
        pred_txt += (f"; step >= {dp['predicted_step_s'] * 1e3:.1f} ms (roofline, {dp['accel']} peaks) vs measured "
                     f"{ours['s_per_step'] * 1e3:.1f} ms: {dp['predicted_step_s'] / ours['s_per_step']:.0%} of peak")
    # 3a's own compiled step, as the planner counts a program (arguments + temporaries + outputs - donated):
    # equal to the prediction when the planner compiled the same program.
    xla = ours.get("memory_analysis")
    own = f"; 3a's step by XLA's analysis {_gib(xla['argument'] + xla['temp'] + xla['output'] - xla['alias'])}" if xla else ""
    if "peak_bytes_in_use" not in after:
        why = _status(oe, "3a") or f"n/a: the {de.get('backend', '?')} backend reports no memory_stats"
        return ["4", what["plan"], pred_txt, f"measured: -{own}", "-", "-", why]
    peak = after["peak_bytes_in_use"]
    compiled = (mem.get("compiled") or {}).get("peak_bytes_in_use")
    note = " (reached while compiling, not by the step)" if compiled is not None and compiled >= peak else ""
    return ["4", what["plan"], pred_txt, f"measured {_gib(peak)}{note}{own}",
            f"{pred / peak:.2f}x predicted/measured", "-", "ok"]  # fmt: skip


def streaming_row(what: dict, o: Outcome, on_gpu: bool) -> Row:
    """Row 5: streaming.py's k = 1 run against its synchronous run."""
    runs = (o.data or {}).get("runs", {})
    target = f"occupancy >= {STREAM_TARGET:.0%} (issue 30)"
    stream = next((r for name, r in runs.items() if name.startswith("stream")), None)
    sync = next((r for name, r in runs.items() if name.startswith("sync")), None)
    if o.error or o.skipped or stream is None or sync is None:
        return ["5", what["streaming"], "-", "-", "-", target, _status(o) or "FAILED: missing runs"]
    return ["5", what["streaming"],
            f"{stream['occupancy']:.0%} occupancy, {stream['decode_steps_per_1k_tokens']:.1f} decode steps / 1k tokens, "
            f"{stream['s_per_step']:.3f} s/RL step",
            f"sync {sync['occupancy']:.0%}, {sync['decode_steps_per_1k_tokens']:.1f} / 1k, {sync['s_per_step']:.3f} s/step",
            f"{sync['s_per_step'] / stream['s_per_step']:.2f}x sync/stream step time", target,
            _judge(stream["occupancy"] >= STREAM_TARGET, on_gpu)]  # fmt: skip


def render(table: list[Row], header: str) -> str:
    cols = ["#", "what", "ours", "peer", "ratio", "target", "result"]
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in table]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the machine


def probe() -> dict:
    """Backend, card and versions, from a short subprocess (the driver itself holds no GPU context)."""
    code = ("import json, jax; d = jax.devices()[0]; print(json.dumps({'backend': jax.default_backend(), "
            "'device_kind': d.device_kind, 'devices': len(jax.devices()), 'jax': jax.__version__}))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=120)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"device_check: jax does not start here: {last_line(proc.stderr)}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30)  # fmt: skip
        info["card"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else ""
    except (OSError, subprocess.TimeoutExpired):
        info["card"] = ""
    info["card"] = info["card"] or info["device_kind"]
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "transformers", "flax"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "missing"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True).stdout.strip() or "unknown"  # fmt: skip
    except OSError:
        info["commit"] = "unknown"
    return info


def plan_worker(json_path: str, train_argv: list[str]) -> None:
    """Row 4's prediction: ``planner.memory.learner_memory``'s train-step phase for train_step.py's config,
    compiled on this process's device (nothing runs). The model comes from the config.json that
    train_step.py's checkpoint has (no weights); the echo diagnostic, a separate phase, is left off so
    that only the train step compiles."""
    sys.path.insert(0, BENCH)
    import _common as C
    import train_step as ts

    args = ts.parse_args(train_argv)
    import jax

    from echorl_jax.planner import context as context_lib, memory

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        C.qwen2_config(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                       kv_heads=args.kv_heads, mlp=args.mlp, tied=args.tied,
                       max_positions=max(4096, args.seq)).save_pretrained(tmp)  # fmt: skip
        cfg = ts.bench_config(args, {"model": {"path": tmp}, "train": {"echo_grad_norm_every": 0}})
        ctx = context_lib.context(cfg, jax.devices()[:1])
        learner = memory.learner_memory(cfg, ctx)
    phase = next(p for p in learner.phases if p.name == "train step")
    # The planner's roofline floor for one train step on this device's accelerator (planner/time.py), when the
    # device is one the planner has peak figures for; the row compares it with 3a's measured step.
    from echorl_jax.planner import time as time_lib

    accel = accel_of(jax.devices()[0].device_kind)
    train_work = next(w for w in learner.work if w.name == "train step").parts[0]
    floor = time_lib.roofline(train_work.flops, train_work.bytes, time_lib.PEAKS[accel]) if accel else None
    C.write_json(json_path, {
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "attention": ctx.mcfg.attention,
        "predicted_peak_bytes": phase.peak, "program_bytes": phase.program, "resident_bytes": phase.resident,
        "params_bytes": ctx.params, "optimizer_bytes": ctx.opt, "train_temp_bytes": learner.train_temp,
        "what": phase.what, "compile_s": time.perf_counter() - t0,
        "predicted_step_s": floor, "accel": accel, "train_step_flops": train_work.flops,
    })  # fmt: skip
    print(f"planner, train step on {jax.devices()[0].device_kind} (attention {ctx.mcfg.attention}): peak "
          f"{phase.peak / 2**30:.2f} GiB = program {phase.program / 2**30:.2f} + resident {phase.resident / 2**30:.2f};"
          f" temporaries {learner.train_temp / 2**30:.2f} GiB")  # fmt: skip


def default_out() -> str:
    return os.path.join(os.environ["OUT"], "device_check.md") if os.environ.get("OUT") else "device_check.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/device_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="tiny shapes, CPU-capable (a smoke run; no GPU targets)")
    ap.add_argument("--out", default=None,
                    help="the table's file (default: $OUT/device_check.md, else ./device_check.md)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for the whole check; a part starts only if its estimate fits in what is left "
                         "(default 470; --quick: 1800)")
    ap.add_argument("--only", default="", help="comma-separated part keys to run (the rest read 'skipped')")
    ap.add_argument("--plan-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.plan_worker:
        plan_worker(args.json, [a for a in rest if a != "--"])
        return 0
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")

    start, t_start = time.monotonic(), datetime.datetime.now(datetime.timezone.utc)
    info = probe()
    on_gpu = info["backend"] == "gpu"
    if not on_gpu and not args.quick:
        raise SystemExit(f"device_check: jax sees no GPU (backend {info['backend']}); the full check needs one "
                         f"(--quick runs tiny shapes on a CPU)")  # fmt: skip
    budget = args.budget_s if args.budget_s is not None else (1800.0 if args.quick else 470.0)
    deadline = start + budget
    todo = parts(args.quick)
    only = {k for k in args.only.split(",") if k}
    unknown = only - {p.key for p in todo}
    if unknown:
        ap.error(f"--only: unknown parts {sorted(unknown)}; parts: {', '.join(p.key for p in todo)}")
    out_path = args.out or default_out()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    stem = os.path.splitext(out_path)[0]
    print(f"[device_check] {info['card']} (jax {info['jax']}, backend {info['backend']}); {len(todo)} parts, "
          f"budget {budget:.0f} s; table -> {out_path}", flush=True)  # fmt: skip

    outcomes: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory() as tmp, open(f"{stem}.log", "w") as log:
        for part in todo:
            if only and part.key not in only:
                part.skip = part.skip or "not in --only"
            outcomes[part.key] = run_part(part, tmp, deadline, log)
    total = time.monotonic() - start

    mode = " (--quick: tiny shapes, targets not judged)" if args.quick else ""
    header = (f"### Device check: {info['card']}, {t_start:%Y-%m-%d %H:%M} UTC{mode}\n\n"
              f"`bash bench/device_check.sh` at commit {info['commit']}: jax {info['jax']} ({info['backend']}, "
              f"{info['device_kind']}), flax {info['flax']}, torch {info['torch']}, transformers "
              f"{info['transformers']}; {total:.0f} s in all. Random weights; every figure one run.")  # fmt: skip
    text = render(rows(todo, outcomes, on_gpu), header)
    timing = ["", "| part | estimate s | wall s | result |", "|---|---|---|---|"]
    timing += [f"| {p.key} | {p.est_s:.0f} | {outcomes[p.key].wall_s:.0f} | "
               f"{'skipped' if outcomes[p.key].skipped else ('FAILED' if outcomes[p.key].error else 'ok')} |"
               for p in todo]  # fmt: skip
    text += "\n" + "\n".join(timing) + "\n"
    print("\n" + text)
    with open(out_path, "w") as f:
        f.write(text)
    with open(f"{stem}.json", "w") as f:
        json.dump({"info": info, "total_s": total, "parts": {k: dataclasses.asdict(o) for k, o in outcomes.items()}},
                  f, indent=1, default=float)  # fmt: skip
    print(f"[device_check] table: {out_path}; logs: {stem}.log; results: {stem}.json")
    failed = [k for k, o in outcomes.items() if o.error]
    if failed:  # the table is written either way; the exit status says that some row holds no figure
        print(f"[device_check] failed parts: {', '.join(failed)} (their rows and {stem}.log say why)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
