"""The luffy paper recipe's loss and gradient equal LUFFY's script's (ElliottYan/LUFFY, exp_scripts/train.sh),
computed in numpy from the formulas in its files: no PPO clip, recomputed old log-probs, its loss scale and
entropy weighting. At the recipe's real shapes: a 512-row optimizer step of 8,192-token responses. The same for
the GRPO recipes and the EchoRL authors' script on the same fork (bibisbar/EchoRL
exp_scripts/baseline_train_pure_grpo.sh): no expert rows, the PPO clip kept (core_algos.compute_policy_loss)."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echorl_jax import config as config_lib
from echorl_jax.rl import objectives as O, offpolicy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "paper", "qwen25_math_7b_luffy.py")
AUTHORS_GRPO = os.path.join(ROOT, "configs", "paper", "qwen25_math_7b_authors_grpo.py")
W, L, C, GAMMA = 8, 8192, 0.001, 0.1  # train.sh: 8 GPUs, max_response_length, entropy_coeff; p_div_p_0.1
EPS = 0.2  # clip_ratio (mix_ppo_trainer.yaml:39): the ratio clipped to [0.8, 1.2] unless loss_remove_clip


def luffy_script_loss(logp, old, ent, mask, prefix, reward_ng, gpu_b, micro_b, clip=False):
    """LUFFY's loss for one optimizer step, float64, and its gradient w.r.t. logp (``clip``: the PPO clip kept,
    core_algos.compute_policy_loss: max(-A r, -A clip(r, 0.8, 1.2)), whose gradient is 0 where the clip binds).

    Advantage (mix_trainer.compute_advantage, grpo with grpo_use_std=False): r - mean of the uid's 8 rows.
    Per micro-batch (mix_core_alg.compute_token_on_off_policy_loss with loss_remove_clip, loss_remove_token_mean,
    off_policy_reshape=p_div_p_0.1, on_policy_reshape=no_reshape; mix_actor.update_policy):
        pg = sum_t mask * (on: -A exp(logp - old); expert: -A p/(p + 0.1)) / L
        loss_m = (pg - C * masked_mean(entropy, mask)) / gradient_accumulation, gradient_accumulation = 1;
    each GPU sums its micro-batches' gradients (loss.backward per micro-batch), FSDP averages the GPUs'."""
    n, g = reward_ng.shape
    adv_b = (reward_ng - reward_ng.mean(axis=1, keepdims=True)).reshape(-1)
    adv = adv_b[:, None] * mask
    logp, old, ent = (x.astype(np.float64) for x in (logp, old, ent))
    p = np.exp(logp)
    r = np.exp(logp - old)
    on_tok, don_tok = -adv * r, -adv * r
    if clip:
        clipped = -adv * np.clip(r, 1 - EPS, 1 + EPS)
        on_tok, don_tok = np.maximum(on_tok, clipped), np.where(clipped > on_tok, 0.0, don_tok)
    pg_tok = np.where(prefix, -adv * p / (p + GAMMA), on_tok)
    dpg_tok = np.where(prefix, -adv * GAMMA * p / (p + GAMMA) ** 2, don_tok)  # d/dlogp
    loss, grad = 0.0, np.zeros_like(logp)
    for gpu in range(W):
        gpu_loss = 0.0
        for m in np.unique(micro_b[gpu_b == gpu]):
            rows = (gpu_b == gpu) & (micro_b == m)
            mk = mask[rows]
            pg = (pg_tok[rows] * mk).sum() / L
            entropy_loss = (ent[rows] * mk).sum() / mk.sum()
            gpu_loss += pg - C * entropy_loss
            grad[rows] += dpg_tok[rows] * mk / L
        loss += gpu_loss
    return loss / W, grad / W


def recipe_batch(cfg, seed=0):
    """One optimizer step of the recipe: 64 groups x 8 rows (the last the expert's), rows spread over LUFFY's 8
    GPUs, 2 micro-batches of 32 rows each, each holding the response tokens the recipe's entropy_norm_tokens
    stands for (its micro-batch estimate)."""
    rows = cfg.rl.prompts_per_step * cfg.rl.group_size // cfg.rl.minibatches
    G, T = cfg.rl.group_size, cfg.sampling.max_new_tokens
    n_m = cfg.objective.entropy_norm_tokens * rows // W  # response tokens per LUFFY micro-batch
    rng = np.random.default_rng(seed)
    gpu_b = np.arange(rows) % W
    micro_b = (np.arange(rows) // W) % 2
    lengths = np.zeros(rows, np.int64)
    for gpu in range(W):
        for m in range(2):
            idx = np.flatnonzero((gpu_b == gpu) & (micro_b == m))
            x = rng.integers(300, 1300, size=len(idx))
            x[:-1] += (n_m - x.sum()) // (len(x) - 1)  # centre the sum on n_m
            x[-1] = n_m - x[:-1].sum()
            assert 1 <= x[-1] <= T
            lengths[idx] = x
    mask = np.arange(T)[None, :] < lengths[:, None]
    logp = -rng.uniform(0.001, 6.0, size=(rows, T)).astype(np.float32)
    old = (logp + rng.normal(0, 0.2, size=(rows, T))).astype(np.float32)  # the second mini-batch: pi_theta moved
    ent = rng.uniform(0, 3, size=(rows, T)).astype(np.float32)
    reward = rng.integers(0, 2, size=(rows // G, G)).astype(np.float32)
    prefix = offpolicy.expert_rows(rows, G, cfg.objective.expert_per_group)[:, None] & mask
    return dict(logp=logp, old=old, ent=ent, mask=mask, prefix=prefix, reward=reward, gpu_b=gpu_b, micro_b=micro_b)


def test_luffy_recipe_is_the_reference_scripts_setting():
    cfg = config_lib.build_config(config_lib.load_config_file(RECIPE))
    obj = cfg.objective
    assert (obj.estimator, obj.policy_loss, obj.aggregation) == ("drgrpo", "pg", "seq-mean-token-sum-norm")
    assert (obj.expert_per_group, obj.shaping_gamma, obj.entropy_coef, obj.kl_coef) == (1, GAMMA, C, 0.0)
    assert cfg.rl.recompute_logp and cfg.data.expert_overlong == "truncate"
    assert (cfg.optim.max_grad_norm, cfg.optim.learning_rate, cfg.rl.minibatches) == (1.0, 1e-6, 2)


def test_grpo_recipes_are_the_echorl_authors_setting():
    cfg = config_lib.build_config(config_lib.load_config_file(AUTHORS_GRPO))
    obj = cfg.objective
    assert (obj.estimator, obj.policy_loss, obj.aggregation) == ("drgrpo", "ppo", "seq-mean-token-sum-norm")
    assert (obj.clip_low, obj.clip_high, obj.entropy_coef, obj.kl_coef, obj.expert_per_group) == (EPS, EPS, C, 0, 0)
    assert cfg.rl.recompute_logp and not cfg.echo.enabled
    grpo = config_lib.build_config(config_lib.load_config_file(RECIPE.replace("_luffy", "_grpo")))
    assert grpo.objective == obj  # every GRPO recipe: the same objective


@pytest.mark.slow  # 4M-token arrays at the recipe's real shapes: ~1 min each on 2 shared cores; CI runs it (-m slow)
@pytest.mark.parametrize("recipe", [RECIPE, AUTHORS_GRPO], ids=["luffy", "authors_grpo"])
def test_recipe_loss_and_gradient_equal_the_reference_scripts(recipe):
    cfg = config_lib.build_config(config_lib.load_config_file(recipe))
    d = recipe_batch(cfg)
    want_loss, want_grad = luffy_script_loss(d["logp"], d["old"], d["ent"], d["mask"], d["prefix"], d["reward"],
                                             d["gpu_b"], d["micro_b"], clip=cfg.objective.policy_loss == "ppo")  # fmt: skip
    mask = jnp.asarray(d["mask"])
    adv = O.compute_advantages(jnp.asarray(d["reward"]), mask, cfg.objective)
    batch = O.LossBatch(mask, adv, jnp.asarray(d["old"]), jnp.zeros(mask.shape), jnp.zeros_like(mask),
                        jnp.asarray(d["prefix"]))  # fmt: skip
    counts = O.global_counts(mask, batch.echo_mask_bt, batch.offpolicy_bt)

    ours_convention = dataclasses.replace(cfg.objective, entropy_norm_tokens=0)

    @jax.jit
    def run(logp, ent):
        loss_fn = lambda lp, obj: O.total_loss(lp, ent, batch, counts, obj, None)[0]  # noqa: E731
        loss, grad = jax.value_and_grad(loss_fn)(logp, cfg.objective)
        return loss, grad, loss_fn(logp, ours_convention)

    loss, grad, ours = run(jnp.asarray(d["logp"]), jnp.asarray(d["ent"]))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-12)
    # Not a coincidence of scale: the entropy aggregated like the policy term (our default) gives another loss.
    assert abs(float(ours) - want_loss) > 1e-3 * abs(want_loss)
