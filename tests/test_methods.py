"""Method presets, config validation, and compile-once checks for the public functions."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echorl_jax import cli, config as config_lib
from echorl_jax.rl import echo as E, methods as M, objectives as O
from echorl_jax.rl.echo import EchoConfig
from echorl_jax.rl.objectives import LossBatch, ObjectiveConfig

EXPECTED = {
    "grpo": dict(estimator="grpo", policy_loss="ppo", aggregation="seq-mean-token-mean"),
    "drgrpo": dict(estimator="drgrpo", policy_loss="ppo", aggregation="seq-mean-token-sum-norm"),
    "dapo": dict(estimator="grpo", clip_high=0.28, aggregation="token-mean", dynamic_sampling=True),
    "gspo": dict(estimator="grpo", policy_loss="gspo", clip_low=3e-4, clip_high=4e-4),
    "rloo": dict(estimator="rloo", policy_loss="ppo"),
    "reinforce_pp": dict(estimator="reinforce_pp", policy_loss="ppo"),
    "cispo": dict(policy_loss="cispo", clip_low=1.0),
    "luffy": dict(estimator="drgrpo", policy_loss="ppo", aggregation="seq-mean-token-sum-norm", expert_per_group=1,
                  shaping_gamma=0.1, entropy_coef=0.001),
}


def test_registry_has_all_methods_with_expected_fields():
    assert M.list_methods() == sorted(EXPECTED)
    for name, fields in EXPECTED.items():
        cfg = M.get_method(name, max_new_tokens=64)
        assert cfg.method == name
        for k, v in fields.items():
            assert getattr(cfg, k) == v, (name, k)
        assert cfg.kl_coef == 0.0


def test_presets_set_objective_fields_only_and_echo_is_separate():
    assert M.split_method_name("dapo+echo") == ("dapo", True)
    assert M.split_method_name("dapo") == ("dapo", False)
    assert M.get_method("dapo+echo", max_new_tokens=64) == M.get_method("dapo", max_new_tokens=64)
    assert M.get_method("grpo", kl_coef=0.04).kl_coef == 0.04
    with pytest.raises(ValueError, match="suffix"):
        M.split_method_name("dapo+foo")
    with pytest.raises(ValueError, match="'ppo2'.*grpo"):
        M.get_method("ppo2")
    with pytest.raises(ValueError, match="unknown ObjectiveConfig fields"):
        M.get_method("grpo", echo_coef=0.1)
    with pytest.raises(ValueError, match="objective.aggregation='sum'"):
        M.get_method("grpo", aggregation="sum")


def test_register_new_method():
    M.register_method("grpo_kl_test", estimator="grpo", kl_coef=0.04, kl_kind="k3")
    try:
        assert M.get_method("grpo_kl_test").kl_coef == 0.04
    finally:
        M._METHODS.pop("grpo_kl_test")
    with pytest.raises(ValueError):
        M.register_method("bad", estimator="nope")


def test_dapo_overlong_buffer_scales_with_response_length():
    assert M.method_fields("dapo")["overlong_buffer"] == M.OfMaxNewTokens(0.2)
    got = {t: M.get_method("dapo", max_new_tokens=t).overlong_buffer for t in (20480, 48, 28, 8, 3, 2, 1)}
    assert got == {20480: 4096, 48: 10, 28: 6, 8: 2, 3: 1, 2: 1, 1: 0}  # the paper's 4096 of 20480; always < T
    assert M.get_method("dapo", overlong_buffer=7).overlong_buffer == 7  # explicit values need no length
    with pytest.raises(ValueError, match=r"'dapo'.*overlong_buffer.*max_new_tokens"):
        M.get_method("dapo")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(method=None, **sections):
    """config.build_config on the built-in default's values (configs/default.py) plus overrides."""
    overrides = dict(sections)
    if method is not None:
        overrides["objective"] = {"method": method, **overrides.get("objective", {})}
    return config_lib.build_config(cli.default_values(), overrides)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("echo", [False, True], ids=["", "+echo"])
def test_every_preset_builds_on_the_default_config(name, echo):
    """`--config.objective.method=NAME[+echo]` works on the default config (max_new_tokens 48)."""
    cfg = build(name + ("+echo" if echo else ""), echo={} if echo else {"enabled": False})
    assert cfg.objective == M.get_method(name, max_new_tokens=cfg.sampling.max_new_tokens)
    assert cfg.objective.method == name and cfg.echo.enabled == echo
    assert cfg.objective.overlong_buffer == (10 if name == "dapo" else 0)
    # Command-line strings resolve the same way.
    overrides = config_lib.parse_overrides([f"--config.objective.method={name}", "--config.sampling.max_new_tokens=20480"])
    assert config_lib.build_config(cli.default_values(), overrides).objective.overlong_buffer == (4096 if name == "dapo" else 0)


def test_preset_values_resolve_against_merged_length_and_explicit_values_win():
    assert build("dapo", sampling={"max_new_tokens": "100"}).objective.overlong_buffer == 20
    assert build("dapo", objective={"overlong_buffer": 3}).objective.overlong_buffer == 3
    assert build("dapo", objective={"overlong_buffer": 0}).objective.overlong_buffer == 0  # explicitly off
    with pytest.raises(config_lib.ConfigError, match="objective.overlong_buffer=48.*max_new_tokens=48"):
        build("dapo", objective={"overlong_buffer": 48})


def test_plus_echo_method_name():
    cfg = build("dapo+echo", echo={"enabled": "true", "coef": 0.01})
    assert (cfg.objective.method, cfg.echo.enabled, cfg.echo.coef) == ("dapo", True, 0.01)
    assert cfg.objective.dynamic_sampling
    for enabled in (False, "false", "0"):
        with pytest.raises(config_lib.ConfigError, match=r"'grpo\+echo'.*echo.enabled=False"):
            build("grpo+echo", echo={"enabled": enabled})
    with pytest.raises(config_lib.ConfigError, match=r"objective.method='grpo\+ehco'.*'\+echo'"):
        build("grpo+ehco")
    with pytest.raises(config_lib.ConfigError, match="'ppo'.*not a known method"):
        build("ppo+echo")


def test_describe_objective_names_whose_setting_it_follows():
    T = 8192
    label = lambda method, **kw: M.describe_objective(M.get_method(method, T, **kw), T)  # noqa: E731
    assert [label(m) for m in ("grpo", "drgrpo", "dapo", "luffy")] == [
        "GRPO (DeepSeekMath)", "Dr.GRPO (Dr.GRPO paper)", "DAPO (DAPO paper)", "LUFFY (LUFFY paper)"]
    authors = M.script_fields("grpo", "EchoRL authors' script")
    assert authors == dict(estimator="drgrpo", policy_loss="ppo", aggregation="seq-mean-token-sum-norm",
                           entropy_coef=0.001)  # fmt: skip
    assert label("grpo", **authors, norm_length=128, entropy_norm_tokens=406) == "GRPO (EchoRL authors' script)"
    assert label("grpo", **authors, clip_high=0.28) == "GRPO (EchoRL authors' script; clip_high=0.28)"
    assert label("grpo", estimator="drgrpo") == "GRPO (DeepSeekMath; estimator='drgrpo')"  # not the whole script
    assert label("luffy", policy_loss="pg", norm_length=128) == "LUFFY (LUFFY's script)"
    assert label("dapo", clip_high=0.3) == "DAPO (DAPO paper; clip_high=0.3)"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_method_with_echo_gives_finite_loss_and_grad(name):
    rng = np.random.default_rng(0)
    N, G, T = 2, 4, 8
    B = N * G
    obj = M.get_method(name, max_new_tokens=T)
    reward = jnp.asarray([[1, 1, 1, 1], [1, 0, 0, 1]], jnp.float32)
    length = rng.integers(1, T - 3, size=B)  # inside the overlong-free zone so rewards stay 1
    mask = jnp.asarray(np.arange(T)[None] < length[:, None])
    tokens = jnp.asarray(rng.integers(0, 4, size=(B, T)), jnp.int32)
    logp = jnp.asarray(-rng.uniform(0.1, 2, size=(B, T)), jnp.float32)
    ent = jnp.asarray(rng.uniform(0, 2, size=(B, T)), jnp.float32)
    assert obj.overlong_buffer == (2 if name == "dapo" else 0)  # round(0.2 * 8)

    @jax.jit
    def step(reward, mask, tokens, logp, ent):
        reward = reward + O.overlong_shaping(mask.sum(1), T, obj).reshape(N, G)
        clips = E.echo_clips(tokens, mask, ent, reward, jnp.array([3]), EchoConfig())
        batch = LossBatch(mask, O.compute_advantages(reward, mask, obj), logp + 0.01, logp, clips.mask_bt)
        counts = O.global_counts(mask, clips.mask_bt)
        return jax.value_and_grad(O.total_loss, has_aux=True)(logp, ent, batch, counts, obj, EchoConfig())

    (loss, metrics), g = step(reward, mask, tokens, logp, ent)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(g))
    assert "echo_loss" in metrics and float(metrics["echo_loss"]) != 0.0


def test_public_functions_trace_once_per_shape():
    """Each public function jits, and a second call with new values and an equal
    (but distinct) config object reuses the compiled program."""
    traces = {}

    def counted(name, fn, static=()):
        def wrapped(*args, **kw):
            traces[name] = traces.get(name, 0) + 1
            return fn(*args, **kw)

        return jax.jit(wrapped, static_argnames=static)

    rng = np.random.default_rng(0)
    N, G, T = 2, 3, 5
    B = N * G

    def inputs():
        mask = jnp.asarray(np.arange(T)[None] < rng.integers(0, T + 1, size=(B, 1)))
        return dict(
            reward=jnp.asarray(rng.integers(0, 2, size=(N, G)), jnp.float32), mask=mask,
            logp=jnp.asarray(-rng.uniform(0.1, 2, size=(B, T)), jnp.float32),
            ent=jnp.asarray(rng.uniform(0, 2, size=(B, T)), jnp.float32),
            tokens=jnp.asarray(rng.integers(0, 4, size=(B, T)), jnp.int32),
        )

    fns = {
        "compute_advantages": counted("compute_advantages", O.compute_advantages, ("cfg",)),
        "overlong_shaping": counted("overlong_shaping", O.overlong_shaping, ("max_len", "cfg")),
        "zero_variance_groups": counted("zero_variance_groups", O.zero_variance_groups),
        "global_counts": counted("global_counts", O.global_counts),
        "total_loss": counted("total_loss", O.total_loss, ("obj", "echo")),
        "echo_clips": counted("echo_clips", E.echo_clips, ("cfg",)),
        "echo_loss": counted("echo_loss", E.echo_loss),
    }
    for _ in range(2):
        d = inputs()
        obj = ObjectiveConfig(estimator="reinforce_pp", kl_coef=0.1, overlong_buffer=2)  # fresh, equal object
        echo = EchoConfig()
        adv = fns["compute_advantages"](d["reward"], d["mask"], cfg=obj)
        fns["overlong_shaping"](d["mask"].sum(1), max_len=T, cfg=obj)
        fns["zero_variance_groups"](d["reward"])
        clips = fns["echo_clips"](d["tokens"], d["mask"], d["ent"], d["reward"], jnp.array([1, 2]), cfg=echo)
        counts = fns["global_counts"](d["mask"], clips.mask_bt)
        batch = LossBatch(d["mask"], adv, d["logp"], d["logp"] - 0.1, clips.mask_bt)
        loss, _ = fns["total_loss"](d["logp"], d["ent"], batch, counts, obj=obj, echo=echo)
        fns["echo_loss"](d["logp"], clips.mask_bt, counts.num_clips)
        assert np.isfinite(float(loss))
    assert traces == {name: 1 for name in fns}
