"""A character-level tokenizer built in code, so the default job downloads nothing.

Vocabulary (101 ids)::

    0 <pad>   1 <bos>   2 <eos>   3 <unk>   4 "\\n"   5 "\\t"   6.. printable ASCII (" " .. "~")

One character is one token, so newline is its own token and is the only token
whose text contains "\\n" (EchoRL's step delimiter). ``decode(encode(s)) == s``
for any ASCII text made of printable characters, newlines and tabs: the decoder
fuses tokens (no spaces inserted) and tokenization-space clean-up is off.
Other characters map to ``<unk>``. Nothing is added on encode (no BOS/EOS, no
chat template): callers prepend ``bos_token_id`` / append ``eos_token_id``
themselves when they want them.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from echorl_jax.models.tokenizer import transformers_quietly

PreTrainedTokenizerFast = transformers_quietly().PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3
CHARS = ("\n", "\t") + tuple(chr(c) for c in range(32, 127))  # "\n" is id 4


def build_char_tokenizer(save_dir: str | None = None) -> PreTrainedTokenizerFast:
    """The character tokenizer; also saved to ``save_dir`` (reload with ``AutoTokenizer``)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one char each
    core.decoder = decoders.Fuse()  # concatenate; the default would join tokens with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,  # it would rewrite " ." -> "." etc.
    )
    if save_dir is not None:
        tok.save_pretrained(save_dir)
    return tok
