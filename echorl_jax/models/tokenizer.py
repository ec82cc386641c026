"""A checkpoint directory's own tokenizer, and the token ids that end a response.

``load_hf_tokenizer(path)`` returns the tokenizer the directory holds, exactly:
with a ``tokenizer.json`` it is that file's tokenizer (``PreTrainedTokenizerFast``,
special tokens and chat template from ``tokenizer_config.json``). ``AutoTokenizer``
is not used for it because transformers 5 maps some model types to a class that
rebuilds the pipeline: a ``model_type: qwen2`` directory becomes
``Qwen2Tokenizer``, whose own digit-splitting pre-tokenizer replaces the file's
(``" 123"`` -> ``Ġ,1,2,3`` instead of the file's ``Ġ123``).

``default_stops(...)`` lists what stops generation by default, with the reason
for each id: the tokenizer's eos, every ``eos_token_id`` of the model
directory's ``generation_config.json``, and the chat template's end-of-turn
token when prompts use the template (``end_of_turn_token`` gives the rule).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from echorl_jax.models.config import ModelConfigError

# Files that hold a vocabulary (tokenizer_config.json alone does not).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tiktoken.model")
GENERATION_CONFIG = "generation_config.json"
_PROBE = "Echo42probe"  # message content for rendering the chat template


def transformers_quietly():
    """The ``transformers`` module, imported without its "PyTorch was not found. Models won't be
    available ..." advice: we use its tokenizers only, and without torch that line reads like a broken
    install. Only that import is quieted (its other advice is left as the user set it)."""
    if "transformers" not in sys.modules:
        old = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
        try:
            import transformers  # noqa: F401
        finally:
            if old is None:
                del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
            else:
                os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = old
    return sys.modules["transformers"]


def load_hf_tokenizer(path: str, key: str = "data.tokenizer"):
    """The tokenizer a local directory holds; ``key`` names the config key that gave ``path`` in errors."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} ({key}) does not exist")
    if not any(os.path.isfile(os.path.join(path, f)) for f in VOCAB_FILES):
        raise FileNotFoundError(
            f"{key}={path!r} holds no tokenizer (none of {', '.join(VOCAB_FILES)}): the tokenizer is missing from "
            "that directory. Set data.tokenizer to the directory of the tokenizer this model was trained with "
            "(e.g. --config.data.tokenizer=/path/to/base-model), or copy its tokenizer files there."
        )
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok = transformers_quietly().PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:  # sentencepiece / vocab files only: the class named in tokenizer_config.json converts them
        tok = transformers_quietly().AutoTokenizer.from_pretrained(path, local_files_only=True)
    if len(tok) <= len(set(tok.all_special_ids)):
        raise FileNotFoundError(f"{key}={path!r}: the tokenizer loads with no vocabulary besides special tokens")
    return tok


def generation_eos_ids(path: str) -> tuple[int, ...]:
    """``eos_token_id`` (an int or a list) of ``path/generation_config.json``; () without one."""
    file = os.path.join(path, GENERATION_CONFIG)
    if not path or not os.path.isfile(file):
        return ()
    try:
        with open(file) as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelConfigError(f"{file}: not a readable JSON object ({e})") from None
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
        raise ModelConfigError(f"{file}: eos_token_id={eos!r} must be a token id or a list of token ids")
    return tuple(eos)


def _added_tokens(tokenizer) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = [str(t) for t in decoder.values()] or list(getattr(tokenizer, "all_special_tokens", []))
    return [t for t in texts if t.strip()]


def end_of_turn_token(tokenizer) -> str | None:
    """The added token that closes a turn in the tokenizer's chat template (None if there is none).

    Rule: render a user message and an assistant message whose content is a probe
    word, with ``add_generation_prompt=False``; the end-of-turn token is the
    longest added (special) token that the text right after the probe starts with,
    whitespace skipped (ChatML ``<|im_end|>``, Llama 3 ``<|eot_id|>``, Gemma
    ``<end_of_turn>``, Mistral ``</s>``). If the template will not render that
    conversation, a lone user message is probed instead.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    candidates = sorted(_added_tokens(tokenizer), key=len, reverse=True)
    for messages in ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}],
                     [{"role": "user", "content": _PROBE}]):  # fmt: skip
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        except Exception:  # noqa: BLE001 -- templates raise anything (jinja errors, raise_exception)
            continue
        if not isinstance(text, str) or _PROBE not in text:
            continue
        rest = text[text.rindex(_PROBE) + len(_PROBE) :].lstrip()
        found = next((c for c in candidates if rest.startswith(c)), None)
        if found is not None:
            return found
    return None


def default_stops(tokenizer, model_dirs: tuple[str, ...] = (), chat: bool = False) -> dict[int, str]:
    """Token id -> why it stops a response, in order: tokenizer eos, generation_config.json, chat end of turn."""
    stops: dict[int, str] = {}
    if tokenizer.eos_token_id is not None:
        stops[int(tokenizer.eos_token_id)] = "tokenizer eos"
    for path in model_dirs:
        for i in generation_eos_ids(path):
            stops.setdefault(i, f"{os.path.join(path, GENERATION_CONFIG)} eos_token_id")
    if chat:
        token = end_of_turn_token(tokenizer)
        if token is not None:
            stops.setdefault(int(tokenizer.convert_tokens_to_ids(token)), "chat template end of turn")
    return stops


def pad_token_id(tokenizer, stops=()) -> tuple[int, str]:
    """``(pad id, why)``: the tokenizer's pad token, else its eos, else the first single-token stop
    (``rl.stop_strings``), else 0; ``why`` is "" for a pad or eos token, else a start-up line saying what
    pads. Any id can pad: padding is masked everywhere (attention, losses, decoding)."""
    for attr in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            return int(getattr(tokenizer, attr)), ""
    single = [s for s in stops if isinstance(s, int)]
    pad = single[0] if single else 0
    what = f"the first stop id {pad}" if single else "id 0"
    return pad, f"pad id: {what} (the tokenizer has no pad or eos token; padding is masked, so any id serves)"


def describe_ids(tokenizer, ids: Any) -> str:
    """``"5 '<|im_end|>'"`` for an id, ``"(7, 8) '\\n\\n'"`` for an id sequence: ids with their texts."""
    seq = [ids] if isinstance(ids, int) else list(ids)
    text = tokenizer.decode(seq, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"{ids if isinstance(ids, int) else tuple(seq)} {text!r}"


def describe_stops(tokenizer, stops, delimiter_ids, delimiter_rule: str) -> list[str]:
    """Start-up log lines: every stop with its text, and the step delimiters with the rule that chose them
    (``echo.resolve_delimiters``): every id with its text when there are up to 8, else a few."""
    ids = [int(i) for i in delimiter_ids]
    shown = "; ".join(describe_ids(tokenizer, i) for i in ids[:8]) + ("; ..." if len(ids) > 8 else "")
    return [
        "stop ids: " + "; ".join(describe_ids(tokenizer, s) for s in stops),
        f"step delimiters: {len(ids)} tokens ({delimiter_rule})" + (f": {shown}" if ids else ""),
    ]
