"""Named RLVR methods as presets of ObjectiveConfig fields.

A preset sets objective fields only; EchoRL is a separate ``EchoConfig`` and is
switched on for any method with ``echo.enabled`` (or the ``"<method>+echo"``
name form accepted by ``split_method_name``). Adding a variant is one
``register_method`` call.

Values that depend on the response length (DAPO's overlong buffer) are given as
``OfMaxNewTokens(fraction)`` and resolved against ``sampling.max_new_tokens``
when the config is built, so every preset runs at every response length.

KL to a reference policy is off in every preset (DAPO and Dr.GRPO drop it for
RLVR, and it saves a reference forward); set ``kl_coef=0.04, kl_kind="k3"`` for
the original GRPO.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from echorl_jax.rl.objectives import ObjectiveConfig

_FIELDS = {f.name for f in dataclasses.fields(ObjectiveConfig)}
_METHODS: dict[str, MappingProxyType] = {}


@dataclasses.dataclass(frozen=True)
class OfMaxNewTokens:
    """A token-count preset value given as a fraction of ``sampling.max_new_tokens``."""

    fraction: float

    def resolve(self, max_new_tokens: int) -> int:
        # Rounded, at least 1 token and strictly below T (a buffer must leave room before
        # it); T = 1 leaves no room, so it resolves to 0 (off).
        return min(max(round(self.fraction * max_new_tokens), 1), max_new_tokens - 1)


def resolve_fields(fields: dict, max_new_tokens: int | None) -> dict:
    """``fields`` with every ``OfMaxNewTokens`` turned into tokens for this response length."""
    relative = sorted(k for k, v in fields.items() if isinstance(v, OfMaxNewTokens))
    if relative and max_new_tokens is None:
        raise ValueError(
            f"method {fields.get('method')!r}: {relative} scale with the response length; "
            "pass max_new_tokens (sampling.max_new_tokens) or set them explicitly"
        )
    return {k: v.resolve(max_new_tokens) if isinstance(v, OfMaxNewTokens) else v for k, v in fields.items()}


def register_method(name: str, **fields) -> None:
    """Register preset ``name``; ``fields`` are ObjectiveConfig overrides (ints that
    count response tokens may be ``OfMaxNewTokens``)."""
    unknown = set(fields) - _FIELDS
    if unknown:
        raise ValueError(f"method {name!r}: unknown ObjectiveConfig fields {sorted(unknown)}")
    if "+" in name:
        raise ValueError(f"method name {name!r} may not contain '+' (reserved for '+echo')")
    for max_new_tokens in (1, 48, 20480):  # every length a config may give must validate
        ObjectiveConfig(**resolve_fields(dict(fields, method=name), max_new_tokens)).validate()
    _METHODS[name] = MappingProxyType(dict(fields, method=name))


# DeepSeekMath GRPO: std-normalised group advantage, PPO clip, 1/|o| per sequence.
register_method("grpo", estimator="grpo", policy_loss="ppo", aggregation="seq-mean-token-mean")
# Dr.GRPO: no std division, constant length normaliser (removes length/difficulty bias).
register_method("drgrpo", estimator="drgrpo", policy_loss="ppo", aggregation="seq-mean-token-sum-norm")
# DAPO: clip-higher, token-level mean, dynamic sampling, soft overlong punishment over the last
# fifth of the response length (paper: 4096 of 20480 tokens).
register_method(
    "dapo",
    estimator="grpo",
    policy_loss="ppo",
    clip_low=0.2,
    clip_high=0.28,
    aggregation="token-mean",
    dynamic_sampling=True,
    overlong_buffer=OfMaxNewTokens(0.2),
    overlong_penalty=1.0,
)
# GSPO: sequence-level (length-normalised) ratio with the paper's tiny clip range.
register_method(
    "gspo", estimator="grpo", policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, aggregation="seq-mean-token-mean"
)
# RLOO: leave-one-out baseline, PPO clip, token-level mean.
register_method("rloo", estimator="rloo", policy_loss="ppo", aggregation="token-mean")
# REINFORCE++-baseline: group-mean baseline then batch whitening, PPO clip.
register_method("reinforce_pp", estimator="reinforce_pp", policy_loss="ppo", aggregation="token-mean")
# CISPO (MiniMax-M1): clipped, stop-gradient IS weight on log pi; no lower bound, tune clip_high.
register_method("cispo", estimator="grpo", policy_loss="cispo", clip_low=1.0, clip_high=0.28, aggregation="token-mean")

# LUFFY (off-policy guidance): k = 1 of the G rows per group is the dataset's expert response; expert tokens
# take -f(pi)*A with f(p) = p/(p + 0.1), on-policy tokens the PPO clip. Group advantage without the std and
# a constant-length normaliser (the public LUFFY script: grpo_use_std=False, loss_remove_token_mean=True),
# entropy bonus 0.001 as there. docs/objectives.md lists where this differs from that script.
register_method(
    "luffy",
    estimator="drgrpo",
    policy_loss="ppo",
    aggregation="seq-mean-token-sum-norm",
    entropy_coef=0.001,
    expert_per_group=1,
    shaping_gamma=0.1,
)


# Whose setting each preset follows (its display name, its source), for labels: evaluate's table rows and the
# paper recipes' docstrings (describe_objective).
SOURCES = {
    "grpo": ("GRPO", "DeepSeekMath"), "drgrpo": ("Dr.GRPO", "Dr.GRPO paper"), "dapo": ("DAPO", "DAPO paper"),
    "gspo": ("GSPO", "GSPO paper"), "rloo": ("RLOO", "RLOO paper"), "reinforce_pp": ("REINFORCE++", "REINFORCE++ paper"),
    "cispo": ("CISPO", "MiniMax-M1 paper"), "luffy": ("LUFFY", "LUFFY paper"),
}  # fmt: skip
# Published training scripts that run a method with other values than its preset: the fields that tell them
# apart. The loss-scale fields (SCALE_FIELDS) are left out: they follow the script's hardware, not its method.
SCRIPTS = {
    # bibisbar/EchoRL exp_scripts/baseline_train_pure_grpo*.sh (LUFFY's fork): grpo_use_std=False,
    # loss_remove_token_mean=True (a token sum / 8192 per micro-batch), entropy_coeff=0.001, PPO clip kept.
    ("grpo", "EchoRL authors' script"): MappingProxyType(
        dict(estimator="drgrpo", policy_loss="ppo", aggregation="seq-mean-token-sum-norm", entropy_coef=0.001)),
    # ElliottYan/LUFFY exp_scripts/train.sh: loss_remove_clip=True (no PPO clip on on-policy tokens).
    ("luffy", "LUFFY's script"): MappingProxyType(dict(policy_loss="pg")),
}  # fmt: skip
SCALE_FIELDS = ("norm_length", "entropy_norm_tokens")


def script_fields(method: str, source: str) -> dict:
    """The objective fields of ``SCRIPTS[(method, source)]`` (what a recipe sets to follow that script)."""
    return dict(SCRIPTS[(method, source)])


def describe_objective(obj: ObjectiveConfig, max_new_tokens: int) -> str:
    """``"GRPO (DeepSeekMath)"``, ``"GRPO (EchoRL authors' script)"``: the method and whose setting its objective
    fields follow (the preset's source, or a script of ``SCRIPTS``); other differences from the preset are listed
    (``"DAPO (DAPO paper; clip_high=0.3)"``). The loss scale (``SCALE_FIELDS``) is not part of a setting."""
    name, source = SOURCES.get(obj.method, (obj.method, f"{obj.method} preset"))
    try:
        preset = ObjectiveConfig(**method_fields(obj.method, max_new_tokens))
    except ValueError:
        return f"{name} (custom method)"
    ignore = {"method", *SCALE_FIELDS}
    diff = {f: getattr(obj, f) for f in sorted(_FIELDS - ignore) if getattr(obj, f) != getattr(preset, f)}
    for (method, script), fields in SCRIPTS.items():
        if method == obj.method and all(getattr(obj, k) == v for k, v in fields.items()):
            source, diff = script, {k: v for k, v in diff.items() if k not in fields}
    extra = "".join(f", {k}={v!r}" for k, v in diff.items())
    return f"{name} ({source}{'; ' + extra[2:] if extra else ''})"


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_fields(name: str, max_new_tokens: int | None = None) -> dict:
    """The ObjectiveConfig field values a preset sets; length-relative values are
    resolved for ``max_new_tokens`` (left as ``OfMaxNewTokens`` when it is None)."""
    if name not in _METHODS:
        raise ValueError(f"objective.method={name!r} is not a known method; expected one of {list_methods()}")
    fields = dict(_METHODS[name])
    return fields if max_new_tokens is None else resolve_fields(fields, max_new_tokens)


def split_method_name(name: str) -> tuple[str, bool]:
    """``"dapo+echo"`` -> ``("dapo", True)``; ``"dapo"`` -> ``("dapo", False)``."""
    base, plus, suffix = name.partition("+")
    if plus and suffix != "echo":
        raise ValueError(f"objective.method={name!r}: the only suffix allowed is '+echo'")
    return base, bool(plus)


def get_method(name: str, max_new_tokens: int | None = None, **overrides) -> ObjectiveConfig:
    """ObjectiveConfig for preset ``name`` (``+echo`` suffix ignored here), with overrides.

    ``max_new_tokens`` is needed when the preset has length-relative values that
    ``overrides`` do not set (dapo's ``overlong_buffer``).
    """
    base, _ = split_method_name(name)
    fields = method_fields(base)
    fields.update(overrides)
    fields = resolve_fields(fields, max_new_tokens)
    unknown = set(fields) - _FIELDS
    if unknown:
        raise ValueError(f"method {base!r}: unknown ObjectiveConfig fields {sorted(unknown)}")
    return ObjectiveConfig(**fields).validate()
