"""One policy update (forward + backward + AdamW): our jitted train_step vs PyTorch ``transformers``.

Both sides start from the SAME random-weight ``Qwen2ForCausalLM`` (built here,
saved to a temp dir, loaded into ours with ``models.hf.load_model``) and see the
same batch of ``B × S`` tokens, split ``P = S/4`` prompt + ``T = 3S/4`` response
(every response token carries loss; no padding). Per step both compute:

* a full forward over all ``B × S`` tokens with logits at every position (ours:
  fp32 logits via ``preferred_element_type``; transformers: logits in the model
  dtype, cast to fp32), sliced to the ``T`` positions that predict the response;
* log-probs and the full-distribution entropy (a metric, no gradient) of the
  response tokens at temperature 1;
* the GRPO loss of ``configs/default.py``: token-mean PPO-clip surrogate
  (ratio against fixed behaviour log-probs, clip 0.2/0.2, log-ratio clamp 20)
  plus ``0.001 × L_echo`` (mean NLL of one EchoClip per group);
* backward, global-norm clipping at 1.0, AdamW (the default job's optimizer:
  lr 1e-4 constant -- its 5 warm-up steps are dropped so the peer's constant lr
  matches -- betas 0.9/0.999, eps 1e-8, no weight decay).

Ours is ``update.make_train_step`` jitted exactly as the trainer does
(``learn_step.setup_train_step``: explicit shardings, donated state, one micro-batch).
The peer is ``model(input_ids).logits`` + the same loss in torch,
``loss.backward()``, ``clip_grad_norm_``, ``torch.optim.AdamW.step()``,
``zero_grad()`` (``--torch-compile`` compiles forward + loss). The first step of
each side is checked against the other (loss and gradient norm).

Model FLOPs per step = 6 × P_matmul × B × S, where P_matmul counts every
parameter except an untied input embedding (a lookup): with tied embeddings it
is all parameters, the embedding counted once as the LM-head matmul. Attention
score FLOPs are not counted.

On CPU the two sides alternate in rounds, so machine contention hits both
alike; on a GPU the peer runs first and frees its memory before ours runs.

    python bench/train_step.py                                # CPU defaults (fp32)
    python bench/train_step.py --preset qwen2.5-0.5b          # GPU target (bf16, 16 x 1024)
    python bench/train_step.py --preset qwen2.5-0.5b --torch-compile
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

# Let torch share a GPU with JAX: no up-front 75 % reservation (the BFC pool still grows and is reused).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

PRESETS = {
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, mlp=4864, vocab=151936, tied=1,
                         dtype="bf16", batch=16, seq=1024),
}  # fmt: skip
GROUP = 8  # rollouts per prompt when building advantages and EchoClips


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--batch", type=int, default=8, help="B rows")
    ap.add_argument("--seq", type=int, default=256, help="S = P + T tokens per row")
    ap.add_argument("--prompt-frac", type=float, default=0.25, help="P / S; the rest is response")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--mlp", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--tied", type=int, default=1, help="tie embeddings (1/0)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="params, optimizer moments and compute")
    ap.add_argument("--remat", choices=("none", "full", "dots", "attn", "dots_attn"), default="none",
                    help="our activation checkpointing (models/transformer.REMAT_POLICIES)")
    ap.add_argument("--logits-chunk", type=int, default=256, help="our output layer's positions per chunk; 0 = all")
    ap.add_argument("--attention", choices=("auto", "xla", "xla_chunked", "cudnn", "splash"), default="auto",
                    help="our attention backend (model.attention; auto: cudnn on GPU+bf16, xla on CPU)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (CPU: the sides alternate between rounds)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side before timing")
    ap.add_argument("--torch-compile", action="store_true", help="torch.compile the peer's forward + loss")
    ap.add_argument("--skip-peer", action="store_true", help="time only ours")
    ap.add_argument("--skip-ours", action="store_true", help="time only the peer (e.g. --torch-compile alone)")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--compile-only", action="store_true",
                    help="only compile ours from abstract shapes and print XLA's memory analysis (no weights, no run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH",
                    help="also write the results as JSON (rewritten as each side finishes, so a crash keeps the "
                         "finished side; on a GPU with JAX's device memory_stats: peak_bytes_in_use)")
    args = ap.parse_args(argv)
    C.apply_preset(args, argv, PRESETS)
    if not 0 < args.prompt_frac < 1:
        ap.error(f"--prompt-frac={args.prompt_frac} must be in (0, 1)")
    if args.skip_ours and (args.skip_peer or args.compile_only):
        ap.error("--skip-ours leaves only the peer: it cannot go with --skip-peer or --compile-only")
    return args


def bench_config(args=None, extra: dict | None = None):
    """The run config both sides' loss and optimizer come from: ``configs/default.py`` with one padded
    micro-batch (bench/packing.py compares packed rows) and no lr warm-up. With ``args``, also the batch
    shape (``prompts_per_step x GROUP`` rows of ``P + T``) and the model's numerics, so that the planner
    (bench/device_check.py) compiles this same step. ``extra``: more overrides, ``{section: {key: value}}``."""
    from echorl_jax import config as config_lib

    over = {"rl": {"micro_batches": 1, "pack_rows_per_micro_batch": 0}, "optim": {"warmup_steps": 0}}
    if args is not None:
        t = args.seq - max(1, round(args.seq * args.prompt_frac))
        g = min(GROUP, args.batch)
        dt = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
        over["rl"].update(prompts_per_step=args.batch // g, group_size=g)
        over["data"] = {"max_prompt_len": args.seq - t}
        over["sampling"] = {"max_new_tokens": t}
        over["model"] = {"param_dtype": dt, "compute_dtype": dt, "remat": args.remat, "attention": args.attention,
                         "logits_chunk": args.logits_chunk}  # fmt: skip
    for section, values in (extra or {}).items():
        over.setdefault(section, {}).update(values)
    base = config_lib.load_config_file(os.path.join(C.REPO, "configs", "default.py"))
    if over.get("model", {}).get("path"):  # the architecture comes from the path's config.json, not the file's
        base = {**base, "model": {}}
    return config_lib.build_config(base, over)


def device_memory():
    """JAX's allocator statistics of device 0 (bytes in use, peak, limit), or None where the backend has
    none (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def make_batch(args, obj_cfg):
    """Host arrays shared by both sides: tokens, advantages, behaviour log-probs, EchoClip masks."""
    import jax.numpy as jnp
    import numpy as np

    from echorl_jax.rl import objectives

    b, s = args.batch, args.seq
    t = s - max(1, round(s * args.prompt_frac))
    g = min(GROUP, b)
    if b % g:
        raise SystemExit(f"--batch={b} must be a multiple of the group size {g}")
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(3, args.vocab, size=(b, s), dtype=np.int32)
    mask = np.ones((b, t), bool)
    reward_ng = rng.integers(0, 2, size=(b // g, g)).astype(np.float32)
    adv = np.asarray(objectives.compute_advantages(jnp.asarray(reward_ng), jnp.asarray(mask), obj_cfg))
    # Behaviour log-probs: a random-init policy is near-uniform, so -log V plus noise gives ratios near 1
    # with a few percent clipped -- the on-policy regime. Values change which tokens clip, not the FLOPs.
    old_logp = (-np.log(args.vocab) + 0.1 * rng.standard_normal((b, t))).astype(np.float32)
    echo = np.zeros((b, t), bool)
    echo[::g, : max(1, t // 3)] = True  # one clip per group: the first rollout's first third
    return dict(tokens=tokens, valid=np.ones((b, s), bool), mask=mask, adv=adv.astype(np.float32),
                old_logp=old_logp, echo=echo, t=t)  # fmt: skip


_COMPILES: list[str] = []  # names of JAX trace/compile events, to spot recompilation inside the timed loop


def _count_compiles():
    import jax

    def listen(name, _secs, **_kw):
        if name in ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration"):
            _COMPILES.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)


class Ours:
    """``learn_step.setup_train_step`` on a model loaded from the HF directory (``path=None``: abstract shapes only,
    for ``--compile-only``)."""

    name = "echorl_jax train_step"

    def __init__(self, args, path, data, cfg):
        from types import SimpleNamespace

        import jax
        import numpy as np
        from flax import nnx

        from echorl_jax import sharding
        from echorl_jax.models import hf
        from echorl_jax.models.config import ModelConfig
        from echorl_jax.models.transformer import Transformer
        from echorl_jax.rl import update
        from echorl_jax.trainer import learn_step

        self.jax = jax
        dt = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
        mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        optimizer = update.make_optimizer(cfg.optim, total_steps=10_000)
        if path is not None:
            model = hf.load_model(path, mesh, param_dtype=dt, compute_dtype=dt, remat=args.remat,
                                  logits_chunk=args.logits_chunk, attention=args.attention)  # fmt: skip
            self.attention = model.attention_impl
            graphdef, params = nnx.split(model)
            opt_state = jax.jit(optimizer.init)(params)
            step0 = jax.device_put(np.int32(0), sharding.replicated(mesh))
        else:
            mcfg = ModelConfig(model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=args.mlp, num_layers=args.layers, num_heads=args.heads,
                               num_kv_heads=args.kv_heads, tie_embeddings=bool(args.tied), param_dtype=dt,
                               compute_dtype=dt, remat=args.remat, max_position_embeddings=max(4096, args.seq),
                               logits_chunk=args.logits_chunk, attention=args.attention)  # fmt: skip
            abstract = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
            self.attention = abstract.attention_impl
            graphdef, params = nnx.split(abstract)
            shardings = nnx.to_pure_dict(sharding.state_shardings(params, mesh))
            sds = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
            nnx.replace_by_pure_dict(params, jax.tree.map(sds, nnx.to_pure_dict(params), shardings))
            rep = sharding.replicated(mesh)
            opt_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                     jax.eval_shape(optimizer.init, params))  # fmt: skip
            step0 = jax.ShapeDtypeStruct((), np.int32, sharding=rep)
        self.num_params = sum(x.size for x in jax.tree.leaves(params))
        self.state = update.TrainState(step0, params, opt_state)
        # The trainer's own jit wrapper; it reads only these attributes of a Setup.
        s = SimpleNamespace(graphdef=graphdef, optimizer=optimizer, cfg=cfg, train_temperature=1.0, mesh=mesh,
                            frozen=None)  # frozen: LoRA's base weights; none here, every weight trains
        self.step = learn_step.setup_train_step(s, self.state)
        ub = update.UpdateBatch(data["tokens"], data["valid"], data["mask"], data["adv"], data["old_logp"],
                                np.zeros_like(data["old_logp"]), data["echo"])  # fmt: skip
        if path is not None:
            self.batch = sharding.shard_batch(ub, mesh)
        else:
            self.batch = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, x.ndim)), ub)
        self.first = None
        self.compile_s = None
        self.memory = None
        self.host_transfer = None
        self.compiles_in_loop = 0
        # Device memory (GPU): after loading (parameters, optimizer state, batch), after compiling (the
        # autotuner's buffers count towards the peak), after the timed steps.
        self.device_memory = {"loaded": device_memory() if path is not None else None}

    def compile(self):
        def lower_compile():
            self.compiled = self.step.lower(self.state, self.batch).compile()

        self.compile_s = C.timed(lower_compile)  # the jit call below reuses this executable
        try:
            self.memory = self.compiled.memory_analysis()
        except Exception:  # not every backend reports it
            self.memory = None
        if self.device_memory["loaded"] is not None:
            self.device_memory["compiled"] = device_memory()

    def one(self):
        self.state, metrics = self.step(self.state, self.batch)
        self.jax.block_until_ready(self.state.params)
        return metrics

    def warmup(self, n):
        if self.compile_s is None:
            self.compile()
        m = self.one()
        self.first = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])}
        # A step must not move data between host and device on its own (no implicit syncs / transfers).
        try:
            with self.jax.transfer_guard("disallow"):
                self.one()
            self.host_transfer = "none"
        except Exception as e:  # report, don't crash the benchmark
            self.host_transfer = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        for _ in range(max(n - 2, 0)):
            self.one()

    def run(self, n):
        before = len(_COMPILES)
        out = [C.timed(self.one) for _ in range(n)]
        self.compiles_in_loop += len(_COMPILES) - before
        return out

    def close(self):
        pass


class Peer:
    """transformers ``Qwen2ForCausalLM`` + the same loss in torch + ``torch.optim.AdamW``."""

    def __init__(self, args, hf_model, data, cfg, device):
        import torch

        self.torch, self.device = torch, device
        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        self.name = "transformers" + (" torch.compile" if args.torch_compile else "") + " + torch AdamW"
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        self.model = hf_model.to(device=device, dtype=dtype).train()
        obj, echo, opt = cfg.objective, cfg.echo, cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        kw = dict(lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps, weight_decay=opt.weight_decay)
        try:  # the fastest stock implementation where available (CUDA, recent CPU builds)
            self.opt = torch.optim.AdamW(params, fused=True, **kw)
            self.name += "(fused)"
        except (RuntimeError, TypeError, ValueError):
            self.opt = torch.optim.AdamW(params, **kw)
        self.params, self.max_norm = params, opt.max_grad_norm
        as_t = lambda x: torch.from_numpy(x).to(device)
        self.tokens = as_t(data["tokens"]).long()
        self.mask = as_t(data["mask"]).float()
        self.adv, self.old = as_t(data["adv"]), as_t(data["old_logp"])
        self.echo_mask = as_t(data["echo"]).float()
        self.t = data["t"]
        lo, hi, clamp, coef = 1 - obj.clip_low, 1 + obj.clip_high, obj.logratio_clamp, echo.coef
        n_tok = self.mask.sum().clamp(min=1)
        num_clips = (self.echo_mask.sum(1) > 0).sum().float().clamp(min=1)
        s, t = self.tokens.shape[1], self.t

        def forward_loss(tokens, mask, adv, old, echo_mask):
            logits = self.model(input_ids=tokens).logits  # [B, S, V]; position s predicts token s+1
            logits_bt = logits[:, s - t - 1 : s - 1].float()
            logp_all = torch.log_softmax(logits_bt, dim=-1)
            logp = logp_all.gather(-1, tokens[:, s - t :, None])[..., 0]
            with torch.no_grad():
                entropy = -(logp_all.exp() * logp_all).sum(-1)  # a metric, as ours
            ratio = torch.exp(torch.clamp((logp - old) * mask, -clamp, clamp))
            pl = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, lo, hi))
            pg_loss = (pl * mask).sum() / n_tok
            clip_len = echo_mask.sum(1).clamp(min=1)
            l_echo = (-(logp * echo_mask).sum(1) / clip_len).sum() / num_clips
            return pg_loss + coef * l_echo, (entropy * mask).sum() / n_tok

        self.forward_loss = torch.compile(forward_loss) if args.torch_compile else forward_loss
        self.first = None
        self.first_s = None
        if device == "cpu":
            self.name += f", {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}"

    def one(self):
        torch = self.torch
        loss, _ = self.forward_loss(self.tokens, self.mask, self.adv, self.old, self.echo_mask)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm) if self.max_norm > 0 else torch.zeros(())
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device != "cpu":
            torch.cuda.synchronize()
        return loss, gn

    def warmup(self, n):
        out = {}

        def first():
            out["m"] = self.one()

        self.first_s = C.timed(first)  # includes torch.compile's tracing + codegen when on
        loss, gn = out["m"]
        self.first = {"loss": float(loss.detach()), "grad_norm": float(gn)}
        for _ in range(max(n - 1, 0)):
            self.one()

    def run(self, n):
        return [C.timed(self.one) for _ in range(n)]

    def close(self):
        del self.model, self.opt, self.params
        if self.device != "cpu":
            self.torch.cuda.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    result = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
    try:
        _main(args, result)
    except BaseException as e:  # the JSON keeps what finished, and says what did not
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        raise
    finally:
        C.write_json(args.json, result)


def _main(args, result):
    import jax

    backend = jax.default_backend()
    cfg = bench_config(args)
    data = make_batch(args, cfg.objective)
    b, s, t = args.batch, args.seq, data["t"]
    result.update(backend=backend, device_kind=jax.devices()[0].device_kind, batch=b, seq=s, response=t)
    print(C.machine_line())
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < (os.cpu_count() or 1):
        print(f"pinned to cores {sorted(os.sched_getaffinity(0))} (both sides)")
    print(f"model: qwen2 hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} mlp={args.mlp} "
          f"vocab={args.vocab} tied={bool(args.tied)} dtype={args.dtype} remat={args.remat} "
          f"attention={args.attention}; batch {b} x {s} tokens "
          f"(prompt {s - t} + response {t}); loss: {cfg.objective.method} ppo-clip token-mean + "
          f"{cfg.echo.coef} x echo NLL; AdamW lr {cfg.optim.learning_rate}, clip-norm {cfg.optim.max_grad_norm}")  # fmt: skip

    if args.compile_only:
        ours = Ours(args, None, data, cfg)
        ours.compile()
        print(f"\ncompiled ours from abstract shapes in {ours.compile_s:.1f} s ({ours.num_params / 1e6:.1f}M params); "
              f"nothing was run")  # fmt: skip
        _report_memory(ours, args, data)
        result["ours"] = _ours_json(ours, [])
        return

    import torch

    device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
    if backend != "cpu" and device == "cpu" and not args.skip_peer:
        print(f"note: JAX runs on {backend} but torch has no CUDA: the peer runs on the CPU (use --skip-peer)")
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = C.build_qwen2_checkpoint(
            None if args.skip_ours else tmp, vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
            mlp=args.mlp, tied=args.tied, max_positions=max(4096, s), seed=args.seed,
        )  # fmt: skip
        ours = None if args.skip_ours else Ours(args, tmp, data, cfg)
    peer = None if args.skip_peer else Peer(args, hf_model, data, cfg, device)
    num_params = ours.num_params if ours else sum(x.numel() for x in hf_model.parameters())  # tied: counted once
    del hf_model
    _count_compiles()

    # ----------------------------------------------------------------- report helpers
    tokens = b * s
    p_matmul = num_params - (0 if args.tied else args.vocab * args.hidden)
    flops = 6 * p_matmul * tokens
    result["model_flops_per_step"] = flops

    times: dict[str, list[float]] = {"ours": [], "peer": []}
    sides = ([("ours", ours)] if ours else []) + ([("peer", peer)] if peer else [])

    def record(key, side):
        if key == "ours":
            result["ours"] = _ours_json(side, times["ours"], flops, tokens)
        else:
            sec = C.median(times["peer"])
            result["peer"] = {"name": side.name, "device": device, "s_per_step": sec, "min_s": min(times["peer"]),
                              "max_s": max(times["peer"]), "tokens_per_s": tokens / sec,
                              "tflops": flops / sec / 1e12, "first_step_s": side.first_s,
                              "compile_s": max(side.first_s - sec, 0.0) if args.torch_compile else None,
                              "first": side.first}  # fmt: skip

    if backend == "cpu":  # alternate, so contention from other jobs hits both sides alike
        for _, side in sides:
            side.warmup(args.warmup)
        for r in range(args.rounds):
            for key, side in sides if r % 2 == 0 else sides[::-1]:
                times[key] += side.run(args.steps)
        for key, side in sides:
            record(key, side)
    else:  # one accelerator: the peer runs first and frees its memory before ours allocates
        for key, side in sides[::-1]:
            side.warmup(args.warmup)
            times[key] += side.run(args.steps * args.rounds)
            if key == "ours":
                side.device_memory["after_steps"] = device_memory()
            record(key, side)
            C.write_json(args.json, result)  # a crash in the next side keeps this one
            side.close()

    # ----------------------------------------------------------------- report
    rows = []
    if peer:
        peer_s = C.median(times["peer"])
        peer_compile = max(peer.first_s - peer_s, 0.0)
        rows.append([peer.name, f"{peer_s:.4f}", C.spread(times["peer"]), f"{tokens / peer_s:,.0f}",
                     f"{flops / peer_s / 1e12:.3f}", f"{peer_compile:.1f}" if args.torch_compile else "-"])  # fmt: skip
    if ours:
        ours_s = C.median(times["ours"])
        rows.append([ours.name, f"{ours_s:.4f}", C.spread(times["ours"]), f"{tokens / ours_s:,.0f}",
                     f"{flops / ours_s / 1e12:.3f}", f"{ours.compile_s:.1f}"])  # fmt: skip
    n = len(times["ours"] or times["peer"])
    print(f"\n{n} timed steps per side ({args.rounds} rounds x {args.steps}) after {args.warmup} warm-up steps; "
          f"medians; model FLOPs/step = 6 x {p_matmul / 1e6:.2f}M params x {tokens} tokens = {flops / 1e12:.3f} TFLOP")  # fmt: skip
    print(C.table(["train step", "s/step (median)", "min-max s", "tokens/s", "model TFLOP/s", "compile s"], rows))
    if peer and ours:
        print(f"\nratio peer / ours: {peer_s / ours_s:.2f}x  (>1: ours is faster)")
        dl = abs(peer.first["loss"] - ours.first["loss"])
        dg = abs(peer.first["grad_norm"] - ours.first["grad_norm"]) / max(abs(peer.first["grad_norm"]), 1e-12)
        print(f"first-step parity: loss ours {ours.first['loss']:.6f} vs peer {peer.first['loss']:.6f} "
              f"(|diff| {dl:.1e}); grad norm ours {ours.first['grad_norm']:.6f} vs peer "
              f"{peer.first['grad_norm']:.6f} (rel diff {dg:.1e})")  # fmt: skip
        result.update(ratio_peer_over_ours=peer_s / ours_s, parity={"loss_abs": dl, "grad_norm_rel": dg})
    if ours:
        print(f"ours: JAX traces/compilations during the {n} timed steps: {ours.compiles_in_loop} (0 = no recompilation); "
              f"implicit host<->device transfers inside a step: {ours.host_transfer}")  # fmt: skip
        _report_memory(ours, args, data)
    if backend == "cpu":
        print("CPU timings: cores are shared with other jobs; contention inflates both sides (see min-max).")


def _ours_json(ours, times, flops=None, tokens=None) -> dict:
    m = ours.memory
    out = {"name": ours.name, "attention": ours.attention, "compile_s": ours.compile_s,
           "num_params": ours.num_params, "first": ours.first, "compiles_in_loop": ours.compiles_in_loop,
           "host_transfer": ours.host_transfer, "device_memory": ours.device_memory,
           "memory_analysis": None if m is None else {
               k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}}  # fmt: skip
    if times:
        sec = C.median(times)
        out.update(s_per_step=sec, min_s=min(times), max_s=max(times), tokens_per_s=tokens / sec,
                   tflops=flops / sec / 1e12)  # fmt: skip
    return out


def _report_memory(ours, args, data):
    gib = lambda x: f"{x / 2**30:.2f} GiB"
    if ours.memory is not None:
        m = ours.memory
        print(f"ours memory (XLA analysis, {ours.jax.default_backend()}): arguments {gib(m.argument_size_in_bytes)}, "
              f"outputs {gib(m.output_size_in_bytes)}, aliased (donated) {gib(m.alias_size_in_bytes)}, "
              f"temporaries {gib(m.temp_size_in_bytes)}")  # fmt: skip
    dm = ours.device_memory
    if dm.get("after_steps") and "peak_bytes_in_use" in dm["after_steps"]:
        print(f"ours device memory (JAX allocator, device 0): peak {gib(dm['after_steps']['peak_bytes_in_use'])} "
              f"in use after the steps (after loading: {gib(dm['loaded'].get('bytes_in_use', 0))} in use; "
              f"after compiling: peak {gib(dm['compiled'].get('peak_bytes_in_use', 0))})")  # fmt: skip
    b, s, t = args.batch, args.seq, data["t"]
    print(f"one fp32 logits tensor: {gib(b * s * args.vocab * 4)} for all {b}x{s} positions "
          f"(the model computes logits at every position), {gib(b * t * args.vocab * 4)} for the {t} response "
          f"positions actually used")  # fmt: skip

if __name__ == "__main__":
    main()
