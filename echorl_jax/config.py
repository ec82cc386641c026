"""The one config schema: frozen dataclass sections, defaults, parsing and validation.

A run is a Python config file whose ``get_config()`` returns a nested dict of
the values that differ from the defaults below, plus dotted command-line
overrides (``--config.model.num_layers=2``). Both are checked against this
schema once, at start-up: an unknown key, a value of the wrong type or an
incompatible combination fails with the key, the value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import types
import typing
from typing import Any, Mapping

from echorl_jax.models.config import NUMERICS, ModelConfig
from echorl_jax.models.lora import LoraConfig
from echorl_jax.rewards.router import RewardConfig
from echorl_jax.rl.echo import EchoConfig
from echorl_jax.rl.objectives import ObjectiveConfig
from echorl_jax.sampling.config import SamplingConfig
from echorl_jax.tasks.arith import ArithTask


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclasses.dataclass(frozen=True)
class ModelSection(ModelConfig):
    """Architecture fields (ModelConfig) plus where the weights come from."""

    path: str = ""  # local Hugging Face directory; "" = random init from the fields here
    seed: int = 0  # init seed when path == "", and of the LoRA A matrices
    # Context extension (LUFFY's Qwen2.5-Math: rope_theta 40000, 16k positions); 0 = keep config.json's / the fields'.
    rope_theta_override: float = 0.0
    max_position_override: int = 0
    lora: LoraConfig = LoraConfig()  # rank > 0: frozen base, trained low-rank adapters (models/lora.py)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    shape: tuple = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
    num_devices: int = 0  # 0 = every visible device; else the first N (e.g. 1 to compare against a mesh)
    # A CPU-only host as this many JAX devices, each running its share of every batch on its own threads
    # (XLA:CPU keeps one device's small ops on about one core); set before JAX starts, by the entry
    # scripts. 0 = JAX's default: one (or XLA_FLAGS' --xla_force_host_platform_device_count).
    cpu_devices: int = 0
    # Disaggregated rollouts: this many devices decode alone (the sampler mesh) while the rest learn (the
    # learner mesh, laid out by mesh.shape), at once under rl.max_staleness; every process gives the sampler
    # sampler_devices / processes of its own devices (its last ones). 0 = colocated: both on every device.
    sampler_devices: int = 0


@dataclasses.dataclass(frozen=True)
class DistConfig:
    """Multi-process runs (cli.maybe_init_distributed). TPU VMs need none of this: auto-detected.
    Each field falls back to its env var (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)."""

    coordinator: str = ""  # "host:port" of process 0 (GPU nodes, tests); "" = env or auto-detect
    num_processes: int = 0  # 0 = env or auto-detect
    process_id: int = -1  # -1 = env or auto-detect
    initialize: str = "auto"  # auto: when set here/in env or on a TPU VM; "always"; "never"
    heartbeat_timeout_s: int = 100  # a process silent this long is dead: the others stop (JAX's default: 100)
    init_timeout_s: int = 300  # how long processes wait for each other at start-up (JAX's default: 300)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # A .parquet / .jsonl / .json path, a tuple of them (a mixture, concatenated in order;
    # on the command line "a.jsonl,b.parquet"), or task:NAME for a built-in task.
    train: str | tuple = "task:arith"
    eval: str | tuple = "auto"  # held-out prompts, as train; "" = none; auto = the train task, or none for files
    tokenizer: str = ""  # HF tokenizer dir; "" = model.path, or the built-in char tokenizer for tasks
    template: str = "auto"  # auto = chat for message-list prompts, {prompt} for strings; "chat"; or a format string with {prompt}
    prompt_key: str = ""  # file column with the prompt; "" = prompt|question (a.b = field b of struct a)
    answer_key: str = ""  # file column with the answer; "" = reward_model.ground_truth|ground_truth|answer
    eval_prompt_key: str = ""  # the eval files' prompt column; "" = as data.prompt_key
    eval_answer_key: str = ""  # the eval files' answer column; "" = as data.answer_key (e.g. TRL-style train, verl eval)
    expert_key: str = ""  # LUFFY (objective.expert_per_group > 0): column with expert responses; "" = expert|target|solution
    add_bos: bool = False
    # Text every assistant turn opens with ("<think>\n" for R1-style think models): appended to each rendered
    # prompt unless the template already ends with it, and stripped from the start of LUFFY expert responses.
    response_prefix: str = ""
    max_prompt_len: int = 48  # P: longer prompts are dropped and counted, or fail (on_overlong)
    on_overlong: str = "drop"  # prompts longer than max_prompt_len: drop | error
    # LUFFY expert responses longer than sampling.max_new_tokens with their stop: truncate (to T tokens, no stop;
    # LUFFY's script) | drop (the record) | error
    expert_overlong: str = "truncate"
    seed: int = 0  # shuffle seed
    num_train: int = 4096  # built-in tasks: generated train prompts
    num_eval_per_level: int = 16  # built-in tasks: held-out prompts per difficulty level

    def __post_init__(self):
        for key in ("train", "eval"):
            object.__setattr__(self, key, _data_sources(f"data.{key}", getattr(self, key)))


def _data_sources(key: str, value: str | tuple) -> str | tuple:
    """One source stays a string; several (a tuple, or "a,b") become a tuple of file paths."""
    if isinstance(value, str):  # command line: "a,b" (or "(a, b)")
        parts = tuple(p.strip().strip("'\"") for p in value.strip().strip("()[]").split(","))
    else:
        parts = tuple(value)
    if len(parts) == 1 and isinstance(parts[0], str):
        return parts[0]
    if not parts:
        return ""
    bad = [p for p in parts if not isinstance(p, str) or not p or is_task(p)]
    if bad:
        raise ValueError(f"{key}={value!r}: a mixture is a list of data file paths; {bad[0]!r}"
                         f" is not one (built-in tasks cannot be mixed)")
    return parts


def is_task(spec: str | tuple) -> bool:
    """`task:NAME`, a built-in task, rather than data files."""
    return isinstance(spec, str) and spec.startswith("task:")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    prompts_per_step: int = 16  # N
    group_size: int = 8  # G rollouts per prompt
    epochs: int = 1  # K passes over each rollout batch
    minibatches: int = 1  # optimizer steps per epoch
    micro_batches: int = 1  # gradient accumulation inside each optimizer step
    # Packed learner rows (rl/packing.py): each micro-batch holds this many rows of P+T tokens per device, each
    # row several whole sequences; every learner pass (train step, old/ref log-probs, echo diagnostic, SFT)
    # packs. The token budget per device per micro-batch is this x (P+T). 0 = one padded row per sequence.
    pack_rows_per_micro_batch: int = 0
    recompute_logp: bool = False  # old log-probs from a forward pass instead of the sampler
    stop_strings: tuple = ()  # extra stop texts (one or more tokens each), besides the default stops (docs/components.md)
    max_sample_rounds: int = 3  # DAPO dynamic sampling: prompt batches drawn at most per step
    # Streaming rollouts (trainer/stream_source.py, docs/training.md): 0 = synchronous (every step samples its
    # batch whole with its own weights); k >= 1 = rollouts still in flight when N groups are complete carry into
    # the next step, and no token more than k policy versions old reaches a loss (older groups are dropped).
    max_staleness: int = 0
    stream_batches: int = 2  # streaming: the pool holds this many prompt batches (N each) in flight


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-5
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of learning_rate
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = 0  # warm-start steps on the task's worked solutions; 0 = none
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine floor at the last step, as a fraction of learning_rate
    cache_dir: str = ""  # where warm-start results are cached; "" = train.workdir/warmstart
    seed: int = 0  # warm-start data order; separate from train.seed so RL seeds can share one warm start


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 20  # RL steps
    workdir: str = "runs/default"  # one run per workdir; a --config file FILE.py without one uses runs/FILE
    seed: int = 0
    log_every: int = 1  # write train metrics (metrics.jsonl, TensorBoard; a stdout line without the progress bar) every N steps
    eval_every: int = 10  # 0 = only at the end
    eval_samples: int = 4  # k samples per held-out prompt (avg@k, pass@k)
    eval_temperature: float = 0.6  # 0 = greedy
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue the run saved in workdir (its config must match); false = move it aside, start afresh
    export_hf: bool = True  # write the final policy as a HF directory
    progress: bool = True  # progress bar
    collapse_guard: str = "warn"  # off | warn | stop: on collapsing accuracy, exploding entropy, never-ending responses (trainer/guard.py)
    echo_grad_norm_every: int = 0  # log the echo term's gradient norm every N steps (one extra backward); 0 = off
    # log the sampler-vs-learner mismatch (mismatch/*) every N steps: one extra forward unless rl.recompute_logp,
    # which measures it every step for free; 0 = only when recomputing
    mismatch_every: int = 0
    checkpoint_dir: str = ""  # "" = workdir/checkpoints; multi-host runs need storage every host sees (gs://...)
    max_nonfinite_updates: int = 5  # NaN/Inf loss or gradient: the update is skipped; this many in a row stop the run (0 = never)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelSection = ModelSection()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    task: ArithTask = ArithTask()
    sampling: SamplingConfig = SamplingConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    echo: EchoConfig = EchoConfig()
    rl: RLConfig = RLConfig()
    reward: RewardConfig = RewardConfig()  # verifier routing, math strictness, custom hook (rewards/router.py)
    optim: OptimConfig = OptimConfig()
    sft: SFTConfig = SFTConfig()
    train: TrainConfig = TrainConfig()
    dist: DistConfig = DistConfig()


# ---------------------------------------------------------------- building


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Checks/converts one leaf value; strings from the command line are parsed by type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        allowed = typing.get_args(typ)
        for t in allowed:
            try:
                return _coerce(key, value, t)
            except ConfigError:
                pass
        raise ConfigError(f"config key {key}={value!r}: expected one of {allowed}")
    if typ is type(None):
        if value is None or value == "None":
            return None
        raise ConfigError(f"config key {key}={value!r}: expected None")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"config key {key}={value!r}: expected a bool (true/false)")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key}={value!r}: expected an int")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key}={value!r}: expected an int")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key}={value!r}: expected a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key}={value!r}: expected a string")
    if typ is tuple or origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            try:
                value = ast.literal_eval(text) if text[:1] in "([" else tuple(v for v in text.split(",") if v)
            except (ValueError, SyntaxError):
                raise ConfigError(f"config key {key}={value!r}: expected a tuple, e.g. '(1, 2)' or 'a,b'") from None
            if not isinstance(value, (list, tuple)):
                value = (value,)
            value = tuple(_literal(v) for v in value)
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"config key {key}={value!r}: expected a tuple")
    raise ConfigError(f"config key {key}: unsupported field type {typ}")


def _literal(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            return v.strip()
    return v


def _build(cls, values: Mapping[str, Any], prefix: str):
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in types_:
            raise ConfigError(f"unknown config key {path!r}; allowed keys here: {', '.join(sorted(types_))}")
        typ = types_[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {path!r} is a section: give a dict, not {value!r}")
            kwargs[key] = _build(typ, value, path)
        else:
            kwargs[key] = _coerce(path, value, typ)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # sections that validate in __post_init__
        raise ConfigError(f"config section {prefix or 'root'!r}: {e}") from None


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def parse_overrides(args: list[str]) -> dict:
    """``["--config.a.b=1", "--config.c", "x"]`` -> ``{"a": {"b": "1"}, "c": "x"}``."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognised argument {arg!r}; overrides look like --config.section.key=value")
        if "=" in arg:
            dotted, value = arg[len("--config.") :].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            dotted, value = arg[len("--config.") :], args[i + 1]
            i += 1
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        i += 1
    return out


def load_config_file(path: str) -> dict:
    """Runs a config file and returns its ``get_config()`` dict."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_echorl_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    values = module.get_config()
    if isinstance(values, Config):
        values = dataclasses.asdict(values)
    if not isinstance(values, Mapping):
        raise ConfigError(f"config file {path!r}: get_config() must return a dict, got {type(values).__name__}")
    return dict(values)


def merge_given(values: Mapping | None = None, overrides: Mapping | None = None) -> dict:
    """Config-file values with the command-line overrides on top: what the user set, before defaults."""
    return _merge(dict(values or {}), overrides or {})


def build_config(values: Mapping | None = None, overrides: Mapping | None = None) -> Config:
    """Defaults <- config-file values <- overrides, then validation."""
    merged = merge_given(values, overrides)
    if isinstance(merged.get("rl"), Mapping) and "reward" in merged["rl"]:
        raise ConfigError(f"config key 'rl.reward'={merged['rl']['reward']!r} moved to the 'reward' section: use reward.name")
    merged = _apply_method_preset(merged)
    cfg = _build(Config, merged, "")
    validate(cfg, merged)
    return cfg


def _apply_method_preset(merged: dict) -> dict:
    """``objective.method`` names a preset (rl/methods.py); fields set explicitly win over it.

    Length-relative preset values (dapo's overlong_buffer) are resolved here against the
    merged ``sampling.max_new_tokens``. ``NAME+echo`` selects preset NAME and turns EchoRL
    on: the built config reads ``objective.method=NAME``, ``echo.enabled=True``.
    """
    from echorl_jax.rl import methods

    section = lambda key: dict(merged[key]) if isinstance(merged.get(key), Mapping) else {}
    objective, sampling, echo = section("objective"), section("sampling"), section("echo")
    name = _coerce("objective.method", objective.get("method", ObjectiveConfig.method), str)
    max_new_tokens = sampling.get("max_new_tokens", SamplingConfig.max_new_tokens)
    max_new_tokens = _coerce("sampling.max_new_tokens", max_new_tokens, int)
    try:
        base, with_echo = methods.split_method_name(name)
        preset = methods.method_fields(base, max_new_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = dict(merged, objective={**preset, **objective, "method": base})
    if with_echo:
        if "enabled" in echo and not _coerce("echo.enabled", echo["enabled"], bool):
            raise ConfigError(
                f"config key objective.method={name!r} turns EchoRL on, but echo.enabled=False is also given; "
                f"use objective.method={base!r} for no EchoRL, or drop echo.enabled"
            )
        out["echo"] = dict(echo, enabled=True)
    return out


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key}={value!r} is invalid: {allowed}")


def architecture_fields() -> set[str]:
    """ModelConfig fields that describe the architecture (read from config.json when model.path is set)."""
    return {f.name for f in dataclasses.fields(ModelConfig)} - set(NUMERICS)


def context_overrides(model: ModelSection) -> dict[str, Any]:
    """ModelConfig fields that ``model.rope_theta_override`` / ``model.max_position_override`` replace."""
    out: dict[str, Any] = {}
    if model.rope_theta_override > 0:
        out["rope_theta"] = float(model.rope_theta_override)
    if model.max_position_override > 0:
        out["max_position_embeddings"] = int(model.max_position_override)
    return out


def validate(cfg: Config, given: Mapping | None = None) -> None:
    """Section validators, then the combinations no single section can check."""
    given = given or {}
    for name in ("sampling", "objective", "echo", "task", "reward"):
        section = getattr(cfg, name)
        if hasattr(section, "validate"):
            try:
                section.validate()
            except ValueError as e:
                raise ConfigError(f"config section {name!r}: {e}") from None
    try:
        cfg.model.lora.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        cfg.model.validate(prefix="model")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.path:
        arch = architecture_fields()
        clash = sorted(arch & set(given.get("model", {})))
        if clash:
            _check(False, f"model.{clash[0]}", given["model"][clash[0]], f"the architecture comes from model.path={cfg.model.path!r} (its config.json); only {', '.join(NUMERICS)} may be overridden")
    _check(cfg.model.rope_theta_override >= 0, "model.rope_theta_override", cfg.model.rope_theta_override, "must be >= 0 (0 = keep)")
    _check(cfg.model.max_position_override >= 0, "model.max_position_override", cfg.model.max_position_override, "must be >= 0 (0 = keep)")
    rl, opt, train = cfg.rl, cfg.optim, cfg.train
    for key in ("prompts_per_step", "group_size", "epochs", "minibatches", "micro_batches"):
        _check(getattr(rl, key) >= 1, f"rl.{key}", getattr(rl, key), "must be >= 1")
    rows = rl.prompts_per_step * rl.group_size
    _check(rows % rl.minibatches == 0, "rl.minibatches", rl.minibatches, f"must divide prompts_per_step*group_size={rows}")
    mb = rows // rl.minibatches
    _check(mb % rl.micro_batches == 0, "rl.micro_batches", rl.micro_batches, f"must divide the minibatch size {mb}")
    _validate_packing(cfg)
    _check(not (cfg.objective.estimator == "rloo" and rl.group_size < 2), "rl.group_size", rl.group_size, "rloo needs group_size >= 2")
    k = cfg.objective.expert_per_group
    _check(k < rl.group_size, "objective.expert_per_group", k,
           f"must be < rl.group_size={rl.group_size} (each group keeps at least one on-policy rollout)")
    _check(
        cfg.objective.overlong_buffer < cfg.sampling.max_new_tokens,
        "objective.overlong_buffer", cfg.objective.overlong_buffer,
        f"must be < sampling.max_new_tokens={cfg.sampling.max_new_tokens} (leave it unset and the dapo preset "
        "uses a fifth of max_new_tokens)",
    )  # fmt: skip
    _check(opt.learning_rate > 0, "optim.learning_rate", opt.learning_rate, "must be > 0")
    _check(opt.schedule in ("constant", "cosine"), "optim.schedule", opt.schedule, "allowed: constant, cosine")
    _check(opt.max_grad_norm >= 0, "optim.max_grad_norm", opt.max_grad_norm, "must be >= 0 (0 disables)")
    _check(train.steps >= 0, "train.steps", train.steps, "must be >= 0")
    _check(train.collapse_guard in ("off", "warn", "stop"), "train.collapse_guard", train.collapse_guard,
           "allowed: off, warn, stop")
    _check(train.log_every >= 1, "train.log_every", train.log_every, "must be >= 1")
    _check(train.mismatch_every >= 0, "train.mismatch_every", train.mismatch_every, "must be >= 0 (0 = only with "
           "rl.recompute_logp)")
    _check(not (train.mismatch_every and rl.recompute_logp), "train.mismatch_every", train.mismatch_every,
           "has no effect with rl.recompute_logp=true, which measures the mismatch every step; leave it 0")
    _check(cfg.objective.rollout_correction == "off" or rl.recompute_logp, "objective.rollout_correction",
           cfg.objective.rollout_correction, "needs rl.recompute_logp=true (the learner's log-probs of the rollout "
           "tokens, before the update)")
    _check(rl.max_staleness >= 0, "rl.max_staleness", rl.max_staleness, "must be >= 0 (0 = synchronous rollouts)")
    _check(rl.stream_batches >= 1, "rl.stream_batches", rl.stream_batches, "must be >= 1")
    _check(rl.max_staleness > 0 or rl.stream_batches == 2, "rl.stream_batches", rl.stream_batches,
           "is read only with rl.max_staleness >= 1 (streaming rollouts); leave it unset")
    streaming_flags = "--config.rl.recompute_logp=true --config.objective.rollout_correction=token_tis"
    _check(rl.max_staleness == 0 or (rl.recompute_logp and "token_tis" in cfg.objective.rollout_correction),
           "rl.max_staleness", rl.max_staleness, "streaming needs the decoupled correction: the learner's log-probs "
           "before the update as the PPO ratio's proximal policy (rl.recompute_logp=true) and the truncated "
           f"importance weight proximal/behaviour (objective.rollout_correction=token_tis); add {streaming_flags} "
           "(docs/training.md, 'Streaming rollouts')")
    _check(cfg.mesh.sampler_devices >= 0, "mesh.sampler_devices", cfg.mesh.sampler_devices,
           "must be >= 0 (0 = sampler and learner share every device)")
    _check(not (cfg.mesh.sampler_devices and rl.max_staleness == 1 and rl.stream_batches > 1), "rl.stream_batches",
           rl.stream_batches, "with mesh.sampler_devices and rl.max_staleness=1 must be 1: the sampler decodes the "
           "next batch while the learner updates, so every token is already one version old when it is learned "
           "from and a rollout carried to a later step would be two (dropped: wasted decoding); set "
           "--config.rl.stream_batches=1, or --config.rl.max_staleness=2 to carry rollouts")
    _check(train.eval_samples >= 1, "train.eval_samples", train.eval_samples, "must be >= 1")
    _check(cfg.mesh.cpu_devices >= 0, "mesh.cpu_devices", cfg.mesh.cpu_devices, "must be >= 0 (0 = JAX's default)")
    _check(cfg.dist.initialize in ("auto", "always", "never"), "dist.initialize", cfg.dist.initialize,
           "one of 'auto', 'always', 'never'")
    _check(train.keep_checkpoints >= 1, "train.keep_checkpoints", train.keep_checkpoints, "must be >= 1")
    _check(train.max_nonfinite_updates >= 0, "train.max_nonfinite_updates", train.max_nonfinite_updates,
           "must be >= 0 (0 = never stop)")
    for key in ("heartbeat_timeout_s", "init_timeout_s"):
        _check(getattr(cfg.dist, key) >= 1, f"dist.{key}", getattr(cfg.dist, key), "must be >= 1 (seconds)")
    _validate_data(cfg.data)
    _check(cfg.data.on_overlong in ("drop", "error"), "data.on_overlong", cfg.data.on_overlong, "allowed: drop, error")
    _check(cfg.data.expert_overlong in ("truncate", "drop", "error"), "data.expert_overlong",
           cfg.data.expert_overlong, "allowed: truncate, drop, error")
    _check(cfg.data.max_prompt_len >= 1, "data.max_prompt_len", cfg.data.max_prompt_len, "must be >= 1")
    _check(cfg.sft.steps >= 0, "sft.steps", cfg.sft.steps, "must be >= 0")
    _check(0 <= cfg.sft.min_lr_ratio <= 1, "sft.min_lr_ratio", cfg.sft.min_lr_ratio, "must be in [0, 1]")
    _check(not (cfg.data.response_prefix and cfg.sft.steps > 0), "data.response_prefix", cfg.data.response_prefix,
           "is not supported with a warm start (sft.steps > 0): the warm start renders prompts without it")


def _validate_packing(cfg: Config) -> None:
    rows = cfg.rl.pack_rows_per_micro_batch
    _check(rows >= 0, "rl.pack_rows_per_micro_batch", rows, "must be >= 0 (0 = padded rows, no packing)")
    if rows:
        _check(cfg.rl.micro_batches == 1, "rl.micro_batches", cfg.rl.micro_batches,
               f"must be 1 with packing (rl.pack_rows_per_micro_batch={rows}): the packed rows' budget sets the "
               "micro-batches")  # fmt: skip


def _validate_data(data: DataConfig) -> None:
    from echorl_jax.data.pipeline import DataError, check_template

    _check(data.train not in ("", "auto"), "data.train", data.train, "give a data file, a tuple of files or task:NAME")
    _check(
        not (is_task(data.eval) and not is_task(data.train)), "data.eval", data.eval,
        f"a built-in task cannot be the held-out set of a file dataset (data.train={data.train!r}): "
        "set data.eval to your eval file(s), or '' for no evaluation",
    )  # fmt: skip
    try:
        check_template(data.template)
    except DataError as e:
        raise ConfigError(f"config key data.template: {e}") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
