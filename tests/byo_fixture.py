"""A "bring your own model" directory like a user's Qwen2-style checkpoint, built offline.

``make_byo_dir(path)`` writes, into one directory:

- a byte-level BPE ``tokenizer.json`` trained in-process on a few strings (GPT-2
  pre-tokenizer, so ``" 123"`` is one pre-token: ``Ġ123`` -- Qwen2Tokenizer's own
  digit-splitting pre-tokenizer would give ``Ġ,1,2,3``), special tokens
  ``<|endoftext|>`` (eos, pad), ``<|im_start|>``, ``<|im_end|>`` and a ChatML
  chat template, saved with ``save_pretrained``;
- a tiny random ``model_type: qwen2`` model exported with ``models.hf.export_model``;
- ``generation_config.json`` with ``eos_token_id`` (int or list, or none).

Import it from a test module as ``from byo_fixture import make_byo_dir``.
"""

from __future__ import annotations

import json
import os

from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from echorl_jax.models.config import ModelConfig
from echorl_jax.models.hf import export_model
from echorl_jax.models.transformer import Transformer

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL = (EOS, IM_START, IM_END)  # ids 0, 1, 2
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRAIN_TEXTS = (
    "What is 12 + 34? The answer is 46.\n",
    "Compute 123 - 7 = 116\nStep by step.\n\n",
    " 1 12 123 1234 the answer\n",
    "user\nassistant\nsystem\n",
)
VOCAB_SIZE = 320  # model vocab >= the tokenizer's ~300 ids


def make_bpe_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``TRAIN_TEXTS``; eos = pad = ``<|endoftext|>``."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    core.train_from_iterator(list(TRAIN_TEXTS) * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS,
                                  additional_special_tokens=[IM_START, IM_END])  # fmt: skip
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def make_byo_dir(
    path,
    *,
    generation_eos: int | list[int] | None = None,
    chat_template: str | None = CHATML,
    tokenizer: bool = True,
    model_type: str = "qwen2",
    seed: int = 0,
) -> str:
    """Writes the checkpoint directory described in the module docstring; returns ``path``.

    ``generation_eos``: ``eos_token_id`` of ``generation_config.json`` (None: no such file).
    ``tokenizer=False`` leaves the tokenizer files out (a weights-only directory).
    """
    path = os.fspath(path)
    qwen2 = model_type == "qwen2"
    cfg = ModelConfig(model_type=model_type, vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, attention_bias=qwen2, tie_embeddings=True,
                      init_std=0.3)  # fmt: skip
    export_model(Transformer(cfg, rngs=nnx.Rngs(seed)), path)
    if tokenizer:
        make_bpe_tokenizer(chat_template).save_pretrained(path)
    if generation_eos is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": generation_eos, "bos_token_id": None, "do_sample": True}, f)
    return path
