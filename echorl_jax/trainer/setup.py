"""Builds everything a run needs from the config: mesh, tokenizer, model, data, verifier, samplers."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from echorl_jax import config as config_lib, sharding
from echorl_jax.data.formats import require_text_field
from echorl_jax.data.pipeline import DataError, PromptPipeline, load_records, resolve_template
from echorl_jax.models.config import ModelConfig, numerics
from echorl_jax.models.hub import resolve_model_dir
from echorl_jax.models.tokenizer import (
    default_stops,
    describe_stops,
    end_of_turn_token,
    load_hf_tokenizer,
    pad_token_id,
)
from echorl_jax.models.transformer import Transformer
from echorl_jax.rewards import build_router
from echorl_jax.rewards.custom import RewardSetupError
from echorl_jax.rewards.router import check_against_data
from echorl_jax.rl import echo as echo_lib, offpolicy, update
from echorl_jax.sampling.layout import DecodeWeights
from echorl_jax.sampling.sampler import make_sampler
from echorl_jax.tasks import arith
from echorl_jax.tasks.tokenizer import build_char_tokenizer
from echorl_jax.trainer import adapters, storage

TASK_PREFIX = "task:"


@dataclasses.dataclass
class Setup:
    cfg: config_lib.Config
    mesh: Any
    tokenizer: Any
    graphdef: Any
    state: update.TrainState
    optimizer: Any
    total_updates: int
    train_temperature: float
    sample: Callable
    eval_sample: Callable | None
    train_pipeline: PromptPipeline
    eval_pipeline: PromptPipeline | None
    eval_initial_state: dict | None
    eval_records: list[dict]
    train_records: list[dict]
    verifier: Any
    delimiter_ids: np.ndarray
    ref_params: Any
    log: Callable[[str], None]
    stop_ids: tuple = ()  # what ends a response: token ids and token-id sequences (stop_ids())
    experts: offpolicy.ExpertTraces | None = None  # LUFFY expert responses of train_records (expert_per_group > 0)
    # LoRA (trainer/adapters.py): the base weights (state.params holds only the adapters), the base model's
    # graph (the KL reference: adapters off) and its identity, saved with every checkpoint. None: full fine-tuning.
    frozen: Any = None
    ref_graphdef: Any = None
    base_identity: dict | None = None
    # mesh.sampler_devices: the sampler's own devices (the learner's are ``mesh``'s); LoRA: the base pushed
    # once to each sampler mesh (by layout)
    sampler_devices: list | None = None
    sampler_bases: dict = dataclasses.field(default_factory=dict)

    def policy(self, params) -> Any:
        """The whole policy State for ``params`` (a TrainState's): samplers and forward passes take it."""
        return update.policy_params(params, self.frozen)

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.policy(self.state.params))

    def export(self, out_dir: str) -> None:
        """The policy as a Hugging Face directory (LoRA: the merged model, W + s*A*B). Every process joins the
        gather; process 0 writes (a bucket's directory: written locally, uploaded)."""
        from echorl_jax.models import hf, peft_export

        model = self.model if self.frozen is None else peft_export.merged_model(self.model)
        with storage.local_dir_for(out_dir, upload=jax.process_index() == 0) as local:
            hf.export_model(model, local, tokenizer=self.tokenizer, stop_ids=self.stop_ids)

    def export_adapter(self, out_dir: str) -> None:
        """LoRA: the adapters as a PEFT adapter directory (models/peft_export.py); as ``export``."""
        from echorl_jax.models import peft_export

        with storage.local_dir_for(out_dir, upload=jax.process_index() == 0) as local:
            peft_export.export_adapter(self.model, local, self.cfg.model.lora.alpha, base_model=self.cfg.model.path,
                                       tokenizer=self.tokenizer)  # fmt: skip

    def decode_weights(self, sampler, params, version: int | None = None) -> DecodeWeights:
        """``sampler``'s decode copy of the policy for a TrainState's ``params`` (sampling/layout.py); with a
        sampler mesh of its own a push tagged with the policy ``version``. LoRA: the adapters and the frozen
        base are copied apart, so a base already in the decode dtype and layout is used as it is (no copy); one
        that is not is copied with the adapters, per call (docs/lora.md), except onto a sampler mesh of its
        own, which keeps the base it was pushed once: then only the adapters move."""
        if self.frozen is None:
            return sampler.decode_weights(params, version)
        layout = sampler.layout_for(self.policy(params))
        adapters = layout.copy(params, version)
        if not layout.split:
            return DecodeWeights(nnx.merge_state(adapters.params, layout.copy(self.frozen).params))
        if id(layout) not in self.sampler_bases:
            self.sampler_bases[id(layout)] = layout.copy(self.frozen).params
        return DecodeWeights(nnx.merge_state(adapters.params, self.sampler_bases[id(layout)]), adapters.version)

    def progress(self, start: int, total: int):
        return Progress(start, total, enabled=self.cfg.train.progress and jax.process_index() == 0)


class Progress:
    """A tqdm bar showing step, reward, accuracy, held-out accuracy and tokens/s."""

    def __init__(self, start: int, total: int, enabled: bool, desc: str = "rl"):
        self._bar = None
        self.enabled = enabled
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

    def advance_to(self, step: int, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(step - self._bar.n)

    def update(self, row: dict, last_eval: dict) -> None:
        if self._bar is None:
            return
        acc_key = next((k for k in last_eval if k.startswith("avg@") and "/" not in k), None)
        post = {"reward": f"{row.get('reward/mean', 0):.3f}", "acc": f"{row.get('accuracy', 0):.3f}"}
        if acc_key:
            post["eval"] = f"{last_eval[acc_key]:.3f}"
        post["clips"] = f"{row.get('echo/num_clips', 0):.0f}"
        post["tok/s"] = f"{row.get('tokens_per_s', 0):.0f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[echorl] {msg}", flush=True)


def load_tokenizer(cfg: config_lib.Config):
    path = cfg.data.tokenizer or cfg.model.path
    if path:  # exactly the tokenizer the directory holds (models/tokenizer.py says why not AutoTokenizer)
        key = "data.tokenizer" if cfg.data.tokenizer else "model.path"
        return load_hf_tokenizer(resolve_model_dir(path, key), key=key)
    if config_lib.is_task(cfg.data.train):
        # Saved for the user by process 0 only: the others build the same tokenizer in memory.
        if jax.process_index() != 0:
            return build_char_tokenizer(None)
        with storage.local_dir_for(storage.join(cfg.train.workdir, "tokenizer")) as local:
            return build_char_tokenizer(local)
    raise config_lib.ConfigError("data.tokenizer is empty and model.path is empty: no tokenizer for a file dataset")


def _task_name(spec: str) -> str:
    name = spec[len(TASK_PREFIX) :]
    if name != "arith":
        raise config_lib.ConfigError(f"data source {spec!r}: unknown built-in task {name!r} (available: task:arith)")
    return name


def _load_files(cfg: config_lib.Config, spec: str | tuple, sft_targets: bool = False, experts: bool = False,
                split: str = "train") -> list[dict]:
    """Records of one file or a mixture, in order; with `sft_targets`, each row must carry a solution,
    with `experts` an expert response (LUFFY). The eval files have their own column keys
    (``data.eval_prompt_key`` / ``data.eval_answer_key``, defaulting to the train files')."""
    d = cfg.data
    keys = (d.prompt_key, d.answer_key, "data.")
    if split == "eval":
        keys = (d.eval_prompt_key or d.prompt_key, d.eval_answer_key or d.answer_key, "data.eval_")
    records = []
    for path in (spec,) if isinstance(spec, str) else spec:
        part = load_records(path, *keys)
        if sft_targets:
            require_text_field(part, "solution", path, f"sft.steps={cfg.sft.steps} (warm start on worked solutions)")
        if experts:
            offpolicy.check_expert_records(part, cfg.data.expert_key, path, _expert_why(cfg))
        records += part
    return records


def _expert_why(cfg: config_lib.Config) -> str:
    return f"objective.expert_per_group={cfg.objective.expert_per_group} (method {cfg.objective.method!r})"


def load_train_records(cfg: config_lib.Config) -> list[dict]:
    experts = cfg.objective.expert_per_group > 0
    if config_lib.is_task(cfg.data.train):
        _task_name(cfg.data.train)
        records = arith.make_records(cfg.task, "train", cfg.data.num_train, cfg.data.seed)
        if experts:  # the task's worked solutions are its expert responses
            offpolicy.check_expert_records(records, cfg.data.expert_key, cfg.data.train, _expert_why(cfg))
        return records
    return _load_files(cfg, cfg.data.train, sft_targets=cfg.sft.steps > 0, experts=experts)


def load_experts(cfg: config_lib.Config, records: list[dict], tokenizer, stops, chat: bool, pad_id: int, log):
    """``(records, ExpertTraces)`` for LUFFY. Expert responses that do not fit in ``sampling.max_new_tokens``
    with their stop token are truncated (``data.expert_overlong='truncate'``), their records dropped ('drop'),
    or refused ('error')."""
    single = [s for s in stops if isinstance(s, int)]
    eot = end_of_turn_token(tokenizer) if chat else None
    stop_id = int(tokenizer.convert_tokens_to_ids(eot)) if eot is not None else (single[0] if single else None)
    if stop_id is None:
        raise config_lib.ConfigError("LUFFY expert responses need a single-token stop (eos or chat end of turn); "
                                     "the stops are all multi-token rl.stop_strings")
    t = cfg.sampling.max_new_tokens
    experts = offpolicy.ExpertTraces(records, tokenizer, key=cfg.data.expert_key, k=cfg.objective.expert_per_group,
                                     max_new_tokens=t, stop_id=stop_id, pad_id=pad_id,
                                     response_prefix=cfg.data.response_prefix)  # fmt: skip
    over = experts.too_long()
    if over.any():
        i = int(np.argmax(over))
        what = (f"{int(over.sum())} of {len(records)} train records have an expert response longer than "
                f"sampling.max_new_tokens={t} tokens with its stop (first: record {i}, data_source "
                f"{records[i]['data_source']!r}, {int(experts.length_rk[i].max())} tokens)")
        if cfg.data.expert_overlong == "error":
            raise DataError(f"data.train={cfg.data.train!r}: {what}; data.expert_overlong='truncate' cuts them "
                            f"to {t} tokens, 'drop' skips them")
        if cfg.data.expert_overlong == "truncate":
            log(f"truncating to {t} tokens (no stop) {what}")
            over = np.zeros_like(over)
        else:
            log(f"dropped {what}")
            records = [r for r, bad in zip(records, over) if not bad]
            experts = experts.subset(~over)
        if not records:
            raise DataError(f"data.train={cfg.data.train!r}: no records left after dropping long expert responses")
    log(f"LUFFY: {cfg.objective.expert_per_group} expert row(s) per group, ending with stop id {stop_id}")
    return records, experts


def eval_source(cfg: config_lib.Config) -> str | tuple:
    """data.eval with "auto" resolved: the train task's held-out split, or none for files."""
    if cfg.data.eval == "auto":
        return cfg.data.train if config_lib.is_task(cfg.data.train) else ""
    return cfg.data.eval


def load_eval_records(cfg: config_lib.Config) -> list[dict]:
    spec = eval_source(cfg)
    if not spec:
        return []
    if config_lib.is_task(spec):
        _task_name(spec)
        return arith.make_eval_records(cfg.task, cfg.data.num_eval_per_level, cfg.data.seed + 1)
    return _load_files(cfg, spec, split="eval")


def model_config(cfg: config_lib.Config) -> ModelConfig:
    fields = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{**fields, **config_lib.context_overrides(cfg.model)})


def build_model(cfg: config_lib.Config, mesh, tokenizer) -> Transformer:
    m = cfg.model
    if m.path:
        from echorl_jax.models import hf

        model = hf.load_model(resolve_model_dir(m.path), mesh, **numerics(m), **config_lib.context_overrides(m))
    else:
        model = sharding.shard_model(Transformer(model_config(cfg), rngs=nnx.Rngs(m.seed)), mesh)
    span = cfg.data.max_prompt_len + cfg.sampling.max_new_tokens
    if span > model.cfg.max_position_embeddings:
        raise config_lib.ConfigError(
            f"data.max_prompt_len + sampling.max_new_tokens = {span} exceeds the model's "
            f"max_position_embeddings={model.cfg.max_position_embeddings}"
        )
    if model.cfg.vocab_size < len(tokenizer):
        raise config_lib.ConfigError(
            f"model vocab_size={model.cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )
    return model


def uses_chat_template(cfg: config_lib.Config, tokenizer) -> bool:
    """Whether prompts are rendered with the chat template ("chat", or "auto" with a tokenizer that has one)."""
    return resolve_template(cfg.data.template, tokenizer) == "chat"


def describe_template(cfg: config_lib.Config, tokenizer) -> str:
    """The start-up line saying how prompts are rendered."""
    given = cfg.data.template
    if uses_chat_template(cfg, tokenizer):
        return f"prompts: the tokenizer's chat template (data.template={given!r}; string prompts are one user message)"
    if given == "auto":
        return "prompts: the text as given (data.template='auto' and the tokenizer has no chat template)"
    return f"prompts: data.template={given!r}"


def describe_rewards(table: dict[str, str], train_sources, eval_sources) -> list[str]:
    """Start-up lines: the verifier of every data source of the train and eval data."""
    lines = []
    for split, sources in (("train", train_sources), ("eval", eval_sources)):
        names = sorted(set(sources))
        shown = ", ".join(f"{s or '(none)'} -> {table[s]}" for s in names[:12])
        if names:
            lines.append(f"rewards ({split}): {shown}" + (f", ... ({len(names)} sources)" if len(names) > 12 else ""))
    return lines


def stop_ids(cfg: config_lib.Config, tokenizer, chat: bool | None = None) -> tuple[int | tuple[int, ...], ...]:
    """Default stops (models.tokenizer.default_stops), then ``rl.stop_strings`` as an id or id sequence each.
    ``chat``: prompts use the chat template, so its end-of-turn token stops too (default: as the config renders prompts)."""
    dirs = (resolve_model_dir(cfg.model.path), resolve_model_dir(cfg.data.tokenizer, "data.tokenizer"))
    dirs = tuple(dict.fromkeys(d for d in dirs if d))
    chat = uses_chat_template(cfg, tokenizer) if chat is None else chat
    ids: list = list(default_stops(tokenizer, dirs, chat=chat))
    for text in cfg.rl.stop_strings:
        enc = tokenizer.encode(text, add_special_tokens=False) if isinstance(text, str) and text else []
        if not enc:
            raise config_lib.ConfigError(f"rl.stop_strings entry {text!r} is invalid: must be a non-empty string")
        ids.append(enc[0] if len(enc) == 1 else tuple(enc))
    if not ids:
        raise config_lib.ConfigError("the tokenizer has no eos_token and rl.stop_strings is empty: nothing stops a response")
    return tuple(dict.fromkeys(ids))


def default_verifier(cfg: config_lib.Config):
    """The reward router of ``cfg.reward``; a bad custom hook fails here, before the model loads."""
    try:
        return build_router(cfg.reward)
    except RewardSetupError as e:
        raise config_lib.ConfigError(str(e)) from e


def _warm_start(cfg: config_lib.Config, model, tokenizer, records, mesh, log):
    from echorl_jax.trainer import sft

    cache_dir = cfg.sft.cache_dir or storage.join(cfg.train.workdir, "warmstart")
    bar = Progress(0, cfg.sft.steps, enabled=cfg.train.progress and jax.process_index() == 0, desc="warm start")
    trained = []

    def on_step(step, m):
        trained.append(step)
        bar.advance_to(step, {"loss": f"{m['loss']:.4f}"})
        if not bar.enabled and step % 100 == 0:
            log(f"warm start step {step}: loss {m['loss']:.4f}")

    try:
        model = sft.warm_start(
            model, tokenizer, records, cfg.sft, mesh=mesh, prompt_len=cfg.data.max_prompt_len,
            response_len=cfg.sampling.max_new_tokens, cache_dir=cache_dir, seed=cfg.sft.seed,
            template=cfg.data.template, add_bos=cfg.data.add_bos, log_fn=on_step,
            pack_rows=cfg.rl.pack_rows_per_micro_batch,
        )  # fmt: skip
    except ValueError as e:
        if "SFT record" not in str(e):
            raise
        raise config_lib.ConfigError(
            f"warm start: {e}; raise sampling.max_new_tokens / data.max_prompt_len or lower task.max_steps"
        ) from None
    bar.close()
    if not trained:
        log(f"warm start: reused the cached result in {cache_dir}")
    return model


def _pipeline(split: str, spec, records: list[dict], tokenizer, log, **kw) -> PromptPipeline:
    """A PromptPipeline whose errors and drop count name the split and its source."""
    try:
        pipe = PromptPipeline(records, tokenizer, **kw)
    except DataError as e:
        raise DataError(f"data.{split}={spec!r}: {e}") from None
    if pipe.num_dropped:
        log(f"dropped {pipe.num_dropped} of {pipe.num_records} {split} prompts longer than "
            f"data.max_prompt_len={kw['max_prompt_len']} ({pipe.longest})")
    return pipe


def _plan_sampler(sampler, params, cfg: config_lib.Config, rollouts: int, log, name: str = "sampler") -> None:
    """Resolves a sampler's memory plan now (decode layout, decode rows from sampling.kv_cache_memory)
    so that a bad setting fails at start-up, and logs it."""
    try:
        plan = sampler.prepare(params, cfg.data.max_prompt_len)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    log(plan.describe(rollouts, name))


def build_setup(cfg: config_lib.Config, *, log: Callable[[str], None] = _log, training: bool = True) -> Setup:
    """Everything a run needs. ``training=False`` (evaluation) builds no optimizer state and no reference copy:
    ``state.opt_state`` is None and the parameters are the only model arrays in memory."""
    rl, tc = cfg.rl, cfg.train
    devices = jax.devices()
    if cfg.mesh.num_devices:
        if cfg.mesh.num_devices > len(devices):
            raise config_lib.ConfigError(f"mesh.num_devices={cfg.mesh.num_devices} but only {len(devices)} devices are visible")
        devices = devices[: cfg.mesh.num_devices]
    try:
        devices, sampler_devices = sharding.split_devices(devices, cfg.mesh.sampler_devices)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    try:
        mesh = sharding.make_mesh(cfg.mesh.shape, devices)
    except ValueError as e:
        where = f" (the learner's {len(devices)} devices, mesh.sampler_devices={len(sampler_devices)})" if sampler_devices else ""
        raise config_lib.ConfigError(f"mesh.shape={cfg.mesh.shape}{where}: {e}") from None
    if sampler_devices:
        log(f"disaggregated: sampler mesh of {len(sampler_devices)} device(s), learner mesh of {len(devices)} "
            f"(mesh.sampler_devices={cfg.mesh.sampler_devices})")
    n_cpu = cfg.mesh.cpu_devices
    if n_cpu and jax.default_backend() == "cpu" and jax.local_device_count() != n_cpu:  # set by the entry scripts
        log(f"note: mesh.cpu_devices={n_cpu} but this process has {jax.local_device_count()} CPU devices (JAX started "
            "before the setting could apply, or XLA_FLAGS chose); running on those")
    rows = rl.prompts_per_step * rl.group_size
    if rows % sharding.batch_divisor(mesh) or (rows // rl.minibatches) % sharding.batch_divisor(mesh):
        raise config_lib.ConfigError(
            f"rl.prompts_per_step*rl.group_size={rows} rows per step (and per minibatch) must be a multiple of the "
            f"mesh's batch axes size {sharding.batch_divisor(mesh)} (mesh.shape={cfg.mesh.shape})"
        )
    hosts = jax.process_count()  # each process reads 1/hosts of every step's prompts (data.PromptPipeline)
    if rl.prompts_per_step % hosts:
        raise config_lib.ConfigError(
            f"rl.prompts_per_step={rl.prompts_per_step} must be a multiple of the number of processes ({hosts})")
    tokenizer = load_tokenizer(cfg)
    train_records = load_train_records(cfg)
    eval_records = load_eval_records(cfg)
    # Everything that can fail on the user's data, template, reward or tokenizer, before any weights load.
    verifier = default_verifier(cfg)
    train_sources, eval_sources = [r["data_source"] for r in train_records], [r["data_source"] for r in eval_records]
    try:
        reward_table = check_against_data(cfg.reward, train_sources + eval_sources)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    chat = uses_chat_template(cfg, tokenizer)
    stops = stop_ids(cfg, tokenizer, chat=chat)
    pad_id, pad_why = pad_token_id(tokenizer, stops)
    log(describe_template(cfg, tokenizer))
    if pad_why:
        log(pad_why)
    for line in describe_rewards(reward_table, train_sources, eval_sources):
        log(line)
    experts = None
    if cfg.objective.expert_per_group > 0:
        train_records, experts = load_experts(cfg, train_records, tokenizer, stops, chat, pad_id, log)
    try:
        delimiter_ids, delimiter_rule = echo_lib.resolve_delimiters(tokenizer, cfg.echo.delimiter_ids)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    delimiter_ids = np.asarray(delimiter_ids, np.int32)
    if cfg.echo.enabled and delimiter_ids.size == 0:
        raise config_lib.ConfigError("echo.enabled=True but the tokenizer has no token containing a newline "
                                     "(echo.delimiter_ids=auto); give the step delimiters as echo.delimiter_ids")
    for line in describe_stops(tokenizer, stops, delimiter_ids, delimiter_rule):
        log(line)
    pipe_kw = dict(max_prompt_len=cfg.data.max_prompt_len, template=cfg.data.template, add_bos=cfg.data.add_bos,
                   pad_id=pad_id, on_overlong=cfg.data.on_overlong, response_prefix=cfg.data.response_prefix)  # fmt: skip
    train_pipeline = _pipeline("train", cfg.data.train, train_records, tokenizer, log, batch_size=rl.prompts_per_step // hosts,
                               mode="train", seed=cfg.data.seed, **pipe_kw)  # fmt: skip
    eval_pipeline = eval_state = None
    if not eval_records:
        log("no held-out evaluation: set data.eval to an eval file (or files)")
    else:
        eval_batch = max(sharding.batch_divisor(mesh), min(rl.prompts_per_step, len(eval_records)))
        eval_batch = -(-eval_batch // hosts)  # per process
        eval_pipeline = _pipeline("eval", eval_source(cfg), eval_records, tokenizer, log, batch_size=eval_batch,
                                  mode="eval", **pipe_kw)  # fmt: skip
        eval_state = eval_pipeline.get_state()

    model = build_model(cfg, mesh, tokenizer)
    log(f"model: {model.cfg.model_type}, {sum(x.size for x in jax.tree.leaves(nnx.state(model))):,} params, mesh {dict(mesh.shape)}")
    if cfg.sft.steps > 0:
        model = _warm_start(cfg, model, tokenizer, train_records, mesh, log)
    lora = adapters.attach(cfg, model, mesh, log) if cfg.model.lora.enabled else None
    graphdef, params = (lora.graphdef, lora.params) if lora else nnx.split(model)
    total_updates = tc.steps * rl.epochs * rl.minibatches
    optimizer = update.make_optimizer(cfg.optim, total_updates)
    opt_state = update.init_opt_state(optimizer, params, mesh) if training else None  # moments sharded like params
    state = update.TrainState(jax.device_put(np.int32(0), sharding.replicated(mesh)), params, opt_state)
    ref_params = None
    if cfg.objective.kl_coef > 0 and training:  # LoRA: the frozen base itself (adapters off); else a copy
        ref_params = lora.frozen if lora else jax.tree.map(lambda x: x.copy(), params)

    common = dict(stop_ids=stops, pad_id=pad_id, mesh=mesh, decode_devices=sampler_devices or None)
    # LUFFY: the sampler draws G - k rollouts per prompt; collect() appends the k expert rows.
    sample = make_sampler(graphdef, cfg.sampling, group_size=rl.group_size - cfg.objective.expert_per_group, **common)
    policy = update.policy_params(params, lora.frozen if lora else None)  # LoRA: adapters + frozen base
    _plan_sampler(sample, policy, cfg, rl.prompts_per_step * (rl.group_size - cfg.objective.expert_per_group), log)
    eval_sample = None
    if eval_pipeline is not None:
        t = tc.eval_temperature
        eval_cfg = dataclasses.replace(cfg.sampling, temperature=t if t > 0 else 1.0, greedy=t <= 0)
        eval_sample = make_sampler(graphdef, eval_cfg, group_size=tc.eval_samples, **common)
        _plan_sampler(eval_sample, policy, cfg, eval_pipeline.batch_size * hosts * tc.eval_samples, log, "held-out sampler")
    return Setup(
        cfg=cfg, mesh=mesh, tokenizer=tokenizer, graphdef=graphdef, state=state, optimizer=optimizer,
        total_updates=total_updates, train_temperature=1.0 if cfg.sampling.greedy else cfg.sampling.temperature,
        sample=sample, eval_sample=eval_sample, train_pipeline=train_pipeline, eval_pipeline=eval_pipeline,
        eval_initial_state=eval_state, eval_records=eval_records, train_records=train_records,
        verifier=verifier, delimiter_ids=delimiter_ids, ref_params=ref_params, log=log,
        stop_ids=stops, experts=experts, frozen=lora.frozen if lora else None,
        ref_graphdef=lora.ref_graphdef if lora else graphdef, base_identity=lora.base_identity if lora else None,
        sampler_devices=sampler_devices or None,
    )  # fmt: skip
