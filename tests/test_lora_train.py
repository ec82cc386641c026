"""LoRA runs end to end on a tiny model directory: only adapters in the state and checkpoints, exact resume,
a resume against other base weights refused, the KL reference is the base model, the planner's LoRA rows."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from test_evaluate import MAX_PROMPT, byo, files, run as run_eval  # noqa: F401  (fixtures)
from test_train import ROOT, _params, _rows

from echorl_jax import config as config_lib, plan, sharding
from echorl_jax.evaluation import benchmark
from echorl_jax.models import hf, lora, peft_export
from echorl_jax.models.config import ModelConfig
from echorl_jax.models.hf import export_model
from echorl_jax.models.transformer import Transformer
from echorl_jax.rl import update
from echorl_jax.sampling.sampler import make_sampler
from echorl_jax.tasks.tokenizer import build_char_tokenizer
from echorl_jax.trainer import run_state, setup as setup_lib, train
from echorl_jax.trainer.checkpoint import Checkpointer

TINY = os.path.join(ROOT, "configs", "tiny_test.py")
ADAPTERS = {n for w, _, _ in lora.TARGETS.values() for n in (lora.a_name(w), lora.b_name(w))}


def make_base_dir(path, seed=0) -> str:
    """The tiny config's architecture as a Hugging Face directory with the task's character tokenizer."""
    values = config_lib.load_config_file(TINY)["model"]
    export_model(Transformer(ModelConfig(**values), rngs=nnx.Rngs(seed)), str(path), tokenizer=build_char_tokenizer())
    return str(path)


def lora_cfg(workdir, base_dir, **sections) -> config_lib.Config:
    values = config_lib.load_config_file(TINY)
    values["model"] = {"path": base_dir, "lora": {"rank": 4, "alpha": 8.0}}
    # An entropy bonus: a random model solves nothing, so without it every advantage (hence gradient) is 0.
    overrides = {"train": {"workdir": str(workdir)}, "sft": {"steps": 0}, "optim": {"learning_rate": 1e-2},
                 "objective": {"entropy_coef": 0.01}}
    for name, fields in sections.items():
        overrides[name] = {**overrides.get(name, {}), **fields}
    return config_lib.build_config(values, overrides)


def _checkpoint_keys(workdir, step) -> set[tuple[str, str]]:
    meta = json.loads((workdir / "checkpoints" / str(step) / "state" / "_METADATA").read_text())
    keys = [[k["key"] for k in v["key_metadata"]] for v in meta["tree_metadata"].values()]
    return {(k[0], k[1] if len(k) > 1 else "") for k in keys}


@pytest.mark.slow  # three short runs (about a minute on 2 shared cores): CI runs it (python -m pytest -q -m slow)
def test_lora_resume_is_exact_and_checkpoints_hold_only_adapters(tmp_path):
    base = make_base_dir(tmp_path / "base")
    straight = train.train(lora_cfg(tmp_path / "a", base, train={"steps": 4, "save_every": 2}))
    first = train.train(lora_cfg(tmp_path / "b", base, train={"steps": 2, "save_every": 2}))
    assert first["step"] == 2
    resumed = train.train(lora_cfg(tmp_path / "b", base, train={"steps": 4, "save_every": 2}))
    assert set(nnx.to_pure_dict(resumed["setup"].state.params)) == ADAPTERS
    jax.tree.map(np.testing.assert_array_equal, _params(straight), _params(resumed))
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    moved = [np.abs(np.asarray(v)).max() for k, v in nnx.to_pure_dict(_params(resumed)).items() if k.startswith("lora_b")]
    assert min(moved) > 0  # every B left zero: the adapters trained

    # The checkpoint: step, adapters and their Adam moments; no base weight.
    keys = _checkpoint_keys(tmp_path / "b", 4)
    assert {k[1] for k in keys if k[0] == "params"} == ADAPTERS
    assert {k[0] for k in keys} <= {"step", "params", "opt_state"}
    # The export: a PEFT adapter directory, no full model unless model.lora.export_merged.
    assert sorted(os.listdir(tmp_path / "b" / "peft_adapter"))[:2] == ["adapter_config.json", "adapter_model.safetensors"]
    assert not os.path.exists(tmp_path / "b" / "hf_export")

    # Same config, other weights in model.path: the adapters do not fit them.
    make_base_dir(base, seed=1)
    with pytest.raises(run_state.ResumeMismatch, match="base model's weights"):
        train.train(lora_cfg(tmp_path / "b", base, train={"steps": 6, "save_every": 2}))


def test_kl_reference_is_the_base_model_without_a_copy(tmp_path):
    base = make_base_dir(tmp_path / "base")
    s = setup_lib.build_setup(lora_cfg(tmp_path / "run", base, objective={"kl_coef": 0.1}), log=lambda _: None)
    assert set(nnx.to_pure_dict(s.state.params)) == ADAPTERS
    # The reference is the frozen base itself: the very same arrays, no second copy.
    ref, frozen = nnx.to_pure_dict(s.ref_params), nnx.to_pure_dict(s.frozen)
    assert ref.keys() == frozen.keys() and all(ref[k] is frozen[k] for k in ref)
    for var in (s.state.params[name] for name in ADAPTERS if name.startswith("lora_b")):  # adapters on
        var.set_value(var.get_value() + 0.3)
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (8, 12), 4, 100), np.int32)
    valid = np.ones_like(tokens, bool)
    forward = lambda graphdef, params: np.asarray(  # noqa: E731
        update.make_forward_logp(graphdef, 6, 1.0, 1)(params, tokens, valid))
    want = forward(*nnx.split(hf.load_model(base)))  # the base checkpoint, loaded afresh
    np.testing.assert_allclose(forward(s.ref_graphdef, s.ref_params), want, atol=1e-6)
    assert np.abs(forward(s.graphdef, s.policy(s.state.params)) - want).max() > 1e-3  # the policy is adapted


@pytest.mark.slow  # samplers on three layouts: slow set (CI runs it)
def test_sampler_decodes_the_adapted_model_copying_the_base_only_when_its_layout_differs(tmp_path):
    """FSDP training mesh, tensor-parallel decode layout (decode_tensor_parallel=2): the decode copy holds the
    base and the adapters on the decode mesh, and the rollouts equal those of the merged model (W + s*A*B)
    sampled the same way. A bf16 base on a data-parallel mesh (tensor parallelism 1) is already in the decode
    layout: the sampler reads the frozen arrays themselves and only the adapters are copied."""
    base = make_base_dir(tmp_path / "base")
    cfg = lora_cfg(tmp_path / "run", base, mesh={"shape": (1, 8, 1)}, sampling={"decode_tensor_parallel": 2})
    s = setup_lib.build_setup(cfg, log=lambda _: None)
    layout = s.sample.layout
    assert layout.tensor_parallel == 2 and layout.needs_copy(s.frozen)
    params = jax.tree.map(lambda x: 1.5 * x + 0.2, s.state.params)  # B != 0: the adapters change the model
    copies = layout.copies
    weights = s.decode_weights(s.sample, params)
    assert layout.copies == copies + 2  # the base and the adapters, apart
    got = nnx.to_pure_dict(weights.params)
    assert got.keys() == nnx.to_pure_dict(s.policy(params)).keys()
    assert got["wq"].sharding.mesh == layout.mesh and "tensor" in got["wq"].sharding.spec

    merged = peft_export.merged_model(nnx.merge(s.graphdef, s.policy(params)))
    plain = make_sampler(nnx.graphdef(merged), cfg.sampling, group_size=s.sample.group_size, stop_ids=s.sample.stop_ids,
                         pad_id=s.sample.pad_id, mesh=s.mesh)  # fmt: skip
    prompts = np.asarray(jax.random.randint(jax.random.key(0), (4, 8), 4, 100), np.int32)
    lengths = np.full((4,), 8, np.int32)
    want = plain(nnx.state(merged), prompts, lengths, 3)
    ours = s.sample(weights, prompts, lengths, 3)
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(want.tokens))
    mask = np.asarray(want.response_mask)
    np.testing.assert_allclose(np.asarray(ours.behaviour_logp)[mask], np.asarray(want.behaviour_logp)[mask], atol=1e-4)
    base_ro = s.sample(s.decode_weights(s.sample, s.state.params), prompts, lengths, 3)
    assert not np.array_equal(np.asarray(base_ro.tokens), np.asarray(want.tokens))  # the adapters mattered

    bf16 = {"param_dtype": "bfloat16", "compute_dtype": "bfloat16"}
    cfg = lora_cfg(tmp_path / "run16", base, mesh={"shape": (8, 1, 1)}, model=bf16)
    s = setup_lib.build_setup(cfg, log=lambda _: None)
    copies = s.sample.layout.copies if s.sample.layout else 0
    got = nnx.to_pure_dict(s.decode_weights(s.sample, s.state.params).params)
    frozen = nnx.to_pure_dict(s.frozen)
    assert all(got[k] is frozen[k] for k in frozen)  # decoded from the base itself
    assert s.sample.layout.copies == copies + 1 and all(got[k].dtype == jax.numpy.bfloat16 for k in ADAPTERS)


def _device0_bytes(tree) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


@pytest.mark.slow  # compiles every planned phase twice: slow set (CI runs it)
def test_planner_counts_adapters_only_for_the_optimizer():
    overrides = {"mesh": {"shape": (1, 4, 2)}, "model": {"param_dtype": "bfloat16", "compute_dtype": "bfloat16",
                                                          "lora": {"rank": 4, "targets": "q,v,down"}}}  # fmt: skip
    cfg = config_lib.build_config(config_lib.load_config_file(TINY), overrides)
    pl = plan.plan(cfg)
    # Independent count: the real base model and adapters placed on the mesh, device 0's buffers.
    mesh = sharding.make_mesh((1, 4, 2))
    model = sharding.shard_model(Transformer(setup_lib.model_config(cfg), rngs=nnx.Rngs(0)), mesh)
    base_bytes = _device0_bytes(nnx.state(model))
    lora.add_adapters(model, cfg.model.lora, mesh=mesh)
    adapter_bytes = _device0_bytes(nnx.state(model, nnx.LoRAParam))
    assert pl.adapters == adapter_bytes and pl.params == base_bytes + adapter_bytes  # the bf16 base stays resident
    assert 2 * pl.adapters <= pl.optimizer <= 2 * pl.adapters + 64  # Adam mu, nu (fp32) of the adapters only
    # The sampler decodes tensor-parallel over 1 device (auto on CPU): the base's decode copy is all of it, bf16,
    # on every device; the adapters' is theirs in bf16 (half their fp32 bytes, replicated).
    assert pl.decode_tp == 1
    assert pl.base_copy == sum(x.size * 2 for x in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam))))
    n_adapter = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert pl.decode_copy == pl.base_copy + 2 * n_adapter
    assert pl.ref_params == 0 and pl.train_peak >= pl.params + pl.optimizer


@pytest.mark.slow  # four evaluate runs (about a minute on 2 shared cores): CI runs it
def test_evaluate_restores_lora_adapters_onto_their_base_only(tmp_path, files, byo, capsys):
    """``evaluate --checkpoint`` on a LoRA run samples the adapted policy (= the merged export's), and refuses
    a checkpoint whose adapters were trained on other base weights."""
    cfg = config_lib.build_config({
        "model": {"path": byo[0], "lora": {"rank": 2, "alpha": 4.0}},
        "data": {"train": files[0], "eval": "", "max_prompt_len": MAX_PROMPT},
        "rl": {"prompts_per_step": 4, "group_size": 2}, "sampling": {"max_new_tokens": 6}})  # fmt: skip
    s = setup_lib.build_setup(cfg, log=lambda _: None)
    trained = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(x.size), x.shape), s.state.params)
    host = {"config": config_lib.to_dict(cfg), "data": {}, "lora_base": s.base_identity}
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
    ckpt.save(1, s.state._replace(params=trained), host)
    ckpt.save(2, s.state._replace(params=trained), dict(host, lora_base=dict(s.base_identity, weights="0" * 16)))
    ckpt.close()
    s.state = s.state._replace(params=trained)
    s.export(str(tmp_path / "merged"))  # W + s*A*B as a plain checkpoint

    _, _, adapted = run_eval(tmp_path, "lora", files, "--checkpoint", str(tmp_path / "run" / "checkpoints" / "1"))
    _, _, merged = run_eval(tmp_path, "merged", files, "--model", str(tmp_path / "merged"))
    _, _, base = run_eval(tmp_path, "base", files, "--model", byo[0])
    texts = lambda lines: [x["response"] for x in lines]  # noqa: E731
    assert texts(adapted) == texts(merged) != texts(base)
    argv = ["--checkpoint", str(tmp_path / "run"), "--data", files[0], "--out", str(tmp_path / "x.json"),
            f"--config.data.max_prompt_len={MAX_PROMPT}"]  # fmt: skip
    assert benchmark.main(argv) == 2  # step 2 records other base weights
    assert "base model's weights" in capsys.readouterr().err


def test_evaluate_rebuilds_the_warm_started_base_of_a_lora_checkpoint(files):
    """A LoRA run that warm-started trained its adapters on the warm-started model: evaluate --checkpoint keeps the
    run's training data and SFT settings (the warm start's cache makes it a load) instead of dropping the warm
    start as it does for full fine-tuning checkpoints, whose parameters are all in the checkpoint."""
    host = config_lib.to_dict(config_lib.build_config(config_lib.load_config_file(os.path.join(ROOT, "configs",
                                                                                                "default_lora.py"))))
    args, _ = benchmark.parse_args(["--checkpoint", "runs/x", "--data", files[0]])
    cfg = benchmark.eval_config(args, {}, host)
    assert cfg.sft.steps == host["sft"]["steps"] > 0 and cfg.data.train == "task:arith"
    assert cfg.data.eval in (files[0], (files[0],))
    full = dict(host, model={k: v for k, v in host["model"].items() if k != "lora"})
    cfg = benchmark.eval_config(args, {}, full)
    assert cfg.sft.steps == 0 and cfg.data.train in (files[0], (files[0],))
