"""model.path as a Hugging Face Hub id: resolved with snapshot_download (mocked: tests stay offline)."""

import json

import huggingface_hub
import pytest
from byo_fixture import make_byo_dir

from echorl_jax import config as config_lib, main as main_lib
from echorl_jax.models import hub
from echorl_jax.sharding import make_mesh
from echorl_jax.trainer import setup as setup_lib


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """snapshot_download replaced by one that records its calls and returns a local BYO directory."""
    local = make_byo_dir(tmp_path / "snapshot", generation_eos=[0, 2])
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        return local

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub._snapshot.cache_clear()
    yield local, calls
    hub._snapshot.cache_clear()


def cfg_for(path):
    return config_lib.build_config({"model": {"path": path}, "data": {"train": "unused.jsonl", "eval": "",
                                                                      "template": "chat"}})


def test_hub_id_is_downloaded_once_and_used_everywhere(fake_hub, capsys):
    local, calls = fake_hub
    cfg = cfg_for("Qwen/Qwen2.5-Math-7B")
    tok = setup_lib.load_tokenizer(cfg)
    model = setup_lib.build_model(cfg, make_mesh((-1, 1, 1)), tok)
    assert model.cfg.model_type == "qwen2" and tok.eos_token == "<|endoftext|>"
    assert set(setup_lib.stop_ids(cfg, tok)) == {0, 2}  # generation_config.json of the snapshot + chat end of turn
    assert len(calls) == 1 and calls[0]["repo_id"] == "Qwen/Qwen2.5-Math-7B" and calls[0]["revision"] is None
    assert "config.json" in calls[0]["allow_patterns"] and "*.safetensors" in calls[0]["allow_patterns"]
    assert main_lib.main(["--print-config", "--config.model.path=Qwen/Qwen2.5-Math-7B"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["hidden_size"] == 32  # the architecture of the snapshot


def test_revision_suffix(fake_hub):
    _, calls = fake_hub
    assert hub.resolve_model_dir("org/model@v1.0") == fake_hub[0]
    assert (calls[0]["repo_id"], calls[0]["revision"]) == ("org/model", "v1.0")


def test_local_paths_never_reach_the_hub(fake_hub, tmp_path):
    _, calls = fake_hub
    for missing in (str(tmp_path / "no_such_dir"), "./runs/x", "runs/x/hf_export", "~/models/m"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            setup_lib.build_model(cfg_for(missing), make_mesh((-1, 1, 1)), tokenizer=None)
    assert hub.resolve_model_dir(fake_hub[0]) == fake_hub[0]  # an existing directory stays as it is
    assert calls == []


def test_offline_hub_failure_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub._snapshot.cache_clear()
    with pytest.raises(FileNotFoundError, match=r"model.path='nobody-xyz/no-model'.*does not exist.*HF_HUB_OFFLINE"):
        hub.resolve_model_dir("nobody-xyz/no-model")
    hub._snapshot.cache_clear()


def test_planner_fetches_only_config_json_of_a_hub_id(fake_hub):
    from echorl_jax import plan

    local, calls = fake_hub
    cfg = cfg_for("Qwen/Qwen2.5-Math-7B")
    assert plan.model_config(cfg).hidden_size == 32  # the snapshot's architecture
    assert calls == [{"repo_id": "Qwen/Qwen2.5-Math-7B", "revision": None, "allow_patterns": ["config.json"]}]


def test_planner_offline_error_names_the_id_and_how_to_pass_a_directory(monkeypatch, capsys):
    from echorl_jax import plan

    def offline(**kwargs):
        raise OSError("offline: cannot reach huggingface.co")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    hub._snapshot.cache_clear()
    try:
        code = plan.main(["--config", "configs/paper/qwen25_math_7b_grpo.py"])
    finally:
        hub._snapshot.cache_clear()
    err = capsys.readouterr().err
    assert code == 2 and "model.path='Qwen/Qwen2.5-Math-7B': fetching config.json" in err
    assert "OSError: offline" in err and "--config.model.path=DIR" in err and "configs/paper/models/" in err


def test_shipped_paper_model_configs_have_the_published_sizes():
    import math

    import jax
    from flax import nnx

    from echorl_jax.models.config import load_hf_config
    from echorl_jax.models.transformer import Transformer

    want = {"qwen25_math_7b": 7.616e9, "qwen25_math_1p5b": 1.544e9, "llama31_8b_instruct": 8.030e9,
            "qwen3_8b_base": 8.191e9}  # parameters of the models on the Hub
    for name, n in want.items():
        mcfg = load_hf_config(f"configs/paper/models/{name}")
        shapes = nnx.state(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))
        assert abs(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) / n - 1) < 1e-3, name
