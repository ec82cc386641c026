"""Load and export Hugging Face checkpoints (``config.json`` + ``*.safetensors``).

Loading never materialises a full model on one device: the model is built
abstractly (``nnx.eval_shape``) and every parameter is assembled with
``jax.make_array_from_callback``, each device reading only its own slice from
the memory-mapped safetensors files. HF stores one tensor per layer in torch
``Linear`` layout (``[out, in]``); ours are stacked on a leading layers axis
with heads split out (``wq [L, H, N, D]``), so each read is a transpose plus a
reshape of a slice.

The safetensors files are read with a small header parser + ``np.memmap``
rather than ``safetensors.safe_open(framework="numpy")``, which cannot return
bf16 tensors; ``ml_dtypes`` gives numpy a bfloat16 and the memmap makes slice
reads lazy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from echorl_jax.models.config import ModelConfig, load_hf_config, to_hf_config
from echorl_jax.models.transformer import Transformer
from echorl_jax.sharding import make_mesh, state_shardings, to_host

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers that old checkpoints carry and transformers ignores too.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
    """A checkpoint directory whose tensors do not match its config.json."""


# --------------------------------------------------------------------------- name/layout map


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one of our parameters is stored in HF.

    ``groups[j]`` lists the dimensions of our (per-layer) array that HF dimension j
    holds, row-major: ``wq [H, N, D]`` is HF ``q_proj.weight [N*D, H]``, groups ((1, 2), (0,)).
    """

    hf: str  # HF tensor name; "{i}" marks a per-layer tensor (ours is stacked over layers)
    groups: tuple[tuple[int, ...], ...]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """HF shape of one tensor, from our per-layer shape."""
        return tuple(math.prod(shape[d] for d in g) for g in self.groups)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        order = [d for g in self.groups for d in g]
        return np.ascontiguousarray(x.transpose(order).reshape(self.hf_shape(x.shape)))

    def read(self, hf: np.ndarray, shape: tuple[int, ...], idx: tuple[slice, ...]) -> np.ndarray:
        """Our per-layer array of ``shape``, sliced by ``idx``, reading only the HF rows/cols it needs."""
        bounds = [s.indices(n)[:2] for s, n in zip(idx, shape)]
        hf_idx, split = [], []
        for g in self.groups:
            # The leading dim of a group is contiguous in HF; trailing dims are read whole, sliced after.
            rest = math.prod(shape[d] for d in g[1:])
            start, stop = bounds[g[0]]
            hf_idx.append(slice(start * rest, stop * rest))
            split += [stop - start] + [shape[d] for d in g[1:]]
        block = np.asarray(hf[tuple(hf_idx)]).reshape(split)
        order = [d for g in self.groups for d in g]
        block = block.transpose(np.argsort(order))
        leading = {g[0] for g in self.groups}
        return block[tuple(slice(None) if d in leading else idx[d] for d in range(len(shape)))]


_T = ((1,), (0,))  # plain 2-D transpose (torch Linear [out, in] -> our [in, out])
_LAYOUTS: dict[str, _Layout] = {
    "embed": _Layout("model.embed_tokens.weight", ((0,), (1,))),
    "wq": _Layout("model.layers.{i}.self_attn.q_proj.weight", ((1, 2), (0,))),
    "wk": _Layout("model.layers.{i}.self_attn.k_proj.weight", ((1, 2), (0,))),
    "wv": _Layout("model.layers.{i}.self_attn.v_proj.weight", ((1, 2), (0,))),
    "wo": _Layout("model.layers.{i}.self_attn.o_proj.weight", ((2,), (0, 1))),
    "bq": _Layout("model.layers.{i}.self_attn.q_proj.bias", ((0, 1),)),
    "bk": _Layout("model.layers.{i}.self_attn.k_proj.bias", ((0, 1),)),
    "bv": _Layout("model.layers.{i}.self_attn.v_proj.bias", ((0, 1),)),
    "bo": _Layout("model.layers.{i}.self_attn.o_proj.bias", ((0,),)),
    "q_norm": _Layout("model.layers.{i}.self_attn.q_norm.weight", ((0,),)),
    "k_norm": _Layout("model.layers.{i}.self_attn.k_norm.weight", ((0,),)),
    "attn_norm": _Layout("model.layers.{i}.input_layernorm.weight", ((0,),)),
    "mlp_norm": _Layout("model.layers.{i}.post_attention_layernorm.weight", ((0,),)),
    "w_gate": _Layout("model.layers.{i}.mlp.gate_proj.weight", _T),
    "w_up": _Layout("model.layers.{i}.mlp.up_proj.weight", _T),
    "w_down": _Layout("model.layers.{i}.mlp.down_proj.weight", _T),
    "final_norm": _Layout("model.norm.weight", ((0,),)),
    "lm_head": _Layout("lm_head.weight", _T),
}


def _expected(name: str, shape: tuple[int, ...]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of each HF tensor behind our parameter ``name`` of ``shape``."""
    layout = _LAYOUTS[name]
    if layout.stacked:
        for i in range(shape[0]):
            yield layout.hf.format(i=i), layout.hf_shape(shape[1:])
    else:
        yield layout.hf, layout.hf_shape(shape)


# --------------------------------------------------------------------------- safetensors I/O


def _read_header(file: str) -> tuple[dict[str, Any], int]:
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class _SafetensorsFile:
    """Lazy tensors of one ``.safetensors`` file: numpy views of a read-only memmap."""

    def __init__(self, file: str):
        self.file = file
        self.header, self._data_start = _read_header(file)
        self._buf = None
        size = os.path.getsize(file) - self._data_start
        for name, info in self.header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                begin, end = info["data_offsets"]
                nbytes = math.prod(info["shape"]) * dtype.itemsize
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{file}: bad header entry for tensor {name!r}: {info}") from None
            if end - begin != nbytes or not 0 <= begin <= end <= size:
                raise CheckpointError(f"{file}: tensor {name!r} has inconsistent data offsets {info['data_offsets']}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype, (begin, end) = _ST_DTYPES[info["dtype"]], info["data_offsets"]
        if begin == end:
            return np.zeros(info["shape"], dtype)
        if self._buf is None:
            self._buf = np.memmap(self.file, dtype=np.uint8, mode="r", offset=self._data_start)
        return self._buf[begin:end].view(dtype).reshape(info["shape"])


def _open_checkpoint(path: str) -> dict[str, _SafetensorsFile]:
    """Tensor name -> the file that holds it. Like transformers: model.safetensors, else the index."""
    single, index_file = os.path.join(path, SAFETENSORS), os.path.join(path, INDEX)
    if os.path.isfile(single):
        st = _SafetensorsFile(single)
        return {name: st for name in st.header}
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"model directory {path!r} has no {SAFETENSORS} or {INDEX}")
    try:
        with open(index_file) as f:
            weight_map = dict(json.load(f)["weight_map"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file}: not a valid safetensors index ({e!r})") from None
    files: dict[str, _SafetensorsFile] = {}
    out = {}
    for name, shard in sorted(weight_map.items()):
        if shard not in files:
            file = os.path.join(path, shard)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{index_file}: shard {shard!r} (holding {name!r}) is missing from {path}")
            files[shard] = _SafetensorsFile(file)
        if name not in files[shard].header:
            raise CheckpointError(f"{index_file}: tensor {name!r} is not in shard {shard!r} as the index says")
        out[name] = files[shard]
    return out


def _write_safetensors(file: str, entries: list[tuple[str, tuple[int, ...], np.dtype]], tensors) -> None:
    """Streams ``tensors`` (an iterator of arrays, in ``entries`` order) into one safetensors file."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(file + ".tmp", "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (name, shape, dtype), x in zip(entries, tensors, strict=True):
            assert x.shape == tuple(shape) and x.dtype == dtype, (name, x.shape, x.dtype)
            f.write(np.ascontiguousarray(x).tobytes())
    os.replace(file + ".tmp", file)  # never leave a truncated model.safetensors behind


# --------------------------------------------------------------------------- load


def _check_names(path: str, cfg: ModelConfig, params: dict[str, tuple[int, ...]], found: dict) -> None:
    expected = {hf: shape for name, full in params.items() for hf, shape in _expected(name, full)}
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{path}: missing tensor {missing[0]!r} with shape {expected[missing[0]]}{more} "
            f"for a {cfg.model_type} model as described by its config.json"
        )
    for name, st in found.items():
        if name in expected:
            if st.shape(name) != expected[name]:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {st.shape(name)}, expected {expected[name]} from config.json"
                )
        elif name == _LAYOUTS["lm_head"].hf and cfg.tie_embeddings:
            embed = found[_LAYOUTS["embed"].hf]
            if st.shape(name) != embed.shape(_LAYOUTS["embed"].hf) or not np.array_equal(
                st.tensor(name), embed.tensor(_LAYOUTS["embed"].hf)
            ):
                raise CheckpointError(
                    f"{path}: config.json sets tie_word_embeddings=true but tensor {name!r} "
                    f"differs from {_LAYOUTS['embed'].hf!r}"
                )
        elif not name.endswith(_IGNORED_SUFFIXES):
            raise CheckpointError(
                f"{path}: unexpected tensor {name!r}: not part of a {cfg.model_type} model as described by its "
                "config.json"
            )


def load_model(path: str, mesh: Mesh | None = None, **config_overrides: Any) -> Transformer:
    """Loads a local HF directory onto ``mesh`` (default: one device), each parameter on its sharding.

    ``config_overrides`` replace ModelConfig fields read from config.json (``param_dtype``,
    ``compute_dtype``, ``remat`` ...). Nothing is downloaded.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        why = "is not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"model directory {path!r} {why}")
    cfg = load_hf_config(path, **config_overrides)
    found = _open_checkpoint(path)
    mesh = mesh if mesh is not None else make_mesh((1, 1, 1), jax.local_devices()[:1])

    # Shapes, dtypes and shardings without initialising anything.
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(state)
    shardings = nnx.to_pure_dict(state_shardings(state, mesh))
    _check_names(path, cfg, {k: v.shape for k, v in shapes.items()}, found)

    def build(name: str, sds: jax.ShapeDtypeStruct) -> jax.Array:
        layout = _LAYOUTS[name]
        done: dict[tuple, np.ndarray] = {}  # devices holding the same slice share one read

        def read(idx: tuple[slice, ...]) -> np.ndarray:
            key = tuple((s.start, s.stop, s.step) for s in idx)
            if key not in done:
                done[key] = read_uncached(idx)
            return done[key]

        def read_uncached(idx: tuple[slice, ...]) -> np.ndarray:
            if not layout.stacked:
                return layout.read(found[layout.hf].tensor(layout.hf), sds.shape, idx).astype(sds.dtype)
            layers = range(*idx[0].indices(sds.shape[0]))
            blocks = []
            for i in layers:
                hf = layout.hf.format(i=i)
                blocks.append(layout.read(found[hf].tensor(hf), sds.shape[1:], idx[1:]).astype(sds.dtype))
            return np.stack(blocks)

        return jax.make_array_from_callback(sds.shape, shardings[name], read, dtype=sds.dtype)

    nnx.replace_by_pure_dict(state, {name: build(name, sds) for name, sds in shapes.items()})
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------- export


def special_token_ids(tokenizer: Any, stop_ids: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json ids, generation_config.json fields) for an export.

    config.json gets the tokenizer's bos/eos/pad ids; generation_config.json's ``eos_token_id`` is every
    single-token stop (``stop_ids``, default the tokenizer's eos). Multi-token stop sequences have no
    ``eos_token_id`` form and are left out (a ``stop_strings`` entry would make ``generate`` demand a
    tokenizer argument).
    """
    ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    singles = [s if isinstance(s, (int, np.integer)) else s[0] for s in stop_ids or () if np.size(s) == 1]
    eos = list(dict.fromkeys(int(s) for s in singles))
    if not eos and ids["eos_token_id"] is not None:
        eos = [int(ids["eos_token_id"])]
    if ids["eos_token_id"] is None and eos:
        ids["eos_token_id"] = eos[0]
    config = {k: int(v) for k, v in ids.items() if v is not None}
    generation = dict(config, eos_token_id=eos[0] if len(eos) == 1 else eos) if eos else {}
    return config, generation


def export_model(
    model: Transformer,
    out_dir: str,
    tokenizer: Any = None,
    dtype: str | None = None,
    stop_ids: Any = None,
    generation: dict[str, Any] | None = None,
) -> None:
    """Writes ``config.json`` + ``model.safetensors`` (+ tokenizer files, ``generation_config.json``).

    ``dtype`` (float32 | bfloat16 | float16) defaults to the model's ``param_dtype``. Parameters are
    gathered to the host one at a time; in multi-host runs every process must call this and only
    process 0 writes. ``stop_ids`` (ids and/or id sequences, as the sampler takes) become
    ``generation_config.json``'s ``eos_token_id`` (see ``special_token_ids``), so ``generate()`` stops
    where the run stopped; ``generation`` adds fields to that file (e.g. ``temperature``).

    The tokenizer is saved as it is (its ``tokenizer.json`` encodes exactly as it did). Note:
    transformers 5's ``AutoTokenizer`` still loads any ``model_type: qwen2`` directory's tokenizer as
    ``Qwen2Tokenizer``, whatever tokenizer_config.json says, re-splitting digits; echorl loads the
    file itself (``models.tokenizer.load_hf_tokenizer``), and so should other readers of a non-Qwen
    tokenizer in such a directory (``PreTrainedTokenizerFast.from_pretrained``).
    """
    cfg = model.cfg
    dtype = dtype or cfg.param_dtype
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is invalid: allowed {EXPORT_DTYPES}")
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    unknown = sorted(set(params) - set(_LAYOUTS))
    if unknown:
        raise ValueError(f"cannot export parameters {unknown}: no Hugging Face name for them")
    names = sorted(params, key=list(_LAYOUTS).index)
    entries = [(hf, shape, np_dtype) for n in names for hf, shape in _expected(n, params[n].shape)]

    def tensors() -> Iterator[np.ndarray]:
        for name in names:
            host = to_host(params[name])  # one stacked parameter on the host at a time
            layout = _LAYOUTS[name]
            for x in host if layout.stacked else [host]:
                yield layout.to_hf(x).astype(np_dtype)

    if jax.process_index() != 0:
        for _ in tensors():  # take part in the gathers, write nothing
            pass
        return
    token_ids, gen = special_token_ids(tokenizer, stop_ids)
    gen.update(generation or {})
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(to_hf_config(cfg, dtype=dtype, torch_dtype=dtype, **token_ids), f, indent=2)
    _write_safetensors(os.path.join(out_dir, SAFETENSORS), entries, tensors())
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if gen:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
