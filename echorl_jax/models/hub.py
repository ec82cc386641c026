"""``model.path`` as a Hugging Face Hub id: the one place this project touches the network.

``resolve_model_dir(path)`` returns a local directory. An existing directory, an
empty string, or anything that does not look like a Hub id (``/abs``, ``./rel``,
``a/b/c``, ``~/x``) comes back unchanged, so a missing local path still fails
with the loader's "does not exist". A string shaped like ``ORG/NAME`` (optionally
``ORG/NAME@REVISION``) that is not a local path is fetched with
``huggingface_hub.snapshot_download`` into the usual HF cache -- only the files a
model directory needs (``ALLOW_PATTERNS``). With ``HF_HUB_OFFLINE=1`` the hub
library serves an already-cached snapshot or fails; the failure is reported
with the id and the reason.
"""

from __future__ import annotations

import functools
import os
import re

ALLOW_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")


def is_hub_id(path: str) -> bool:
    """``ORG/NAME[@REVISION]`` that is not an existing local path."""
    return bool(path) and bool(_HUB_ID.match(path)) and ".." not in path and not os.path.exists(path)


def resolve_model_dir(path: str, key: str = "model.path") -> str:
    """A local directory for ``path`` (see the module docstring); ``key`` names the config key in errors."""
    if not is_hub_id(path):
        return path
    try:
        return _snapshot(path)
    except Exception as e:  # noqa: BLE001 -- hub errors are many types (offline, 404, auth, network)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = " (HF_HUB_OFFLINE is set: only an already-cached snapshot can be used)" if offline else ""
        raise FileNotFoundError(
            f"{key}={path!r}: model directory {path!r} does not exist, and fetching it as a Hugging Face Hub "
            f"id failed{hint}: {type(e).__name__}: {e}"
        ) from None


def resolve_config_dir(path: str, key: str = "model.path") -> str:
    """A local directory holding ``path``'s ``config.json``: ``path`` itself unless it is a Hub id, whose
    ``config.json`` alone is fetched (the memory planner reads the architecture, not the weights)."""
    if not is_hub_id(path):
        return path
    try:
        return _snapshot(path, ("config.json",))
    except Exception as e:  # noqa: BLE001 -- hub errors are many types (offline, 404, auth, network)
        raise FileNotFoundError(
            f"{key}={path!r}: fetching config.json of the Hugging Face Hub id {path!r} failed "
            f"({type(e).__name__}: {e}). Pass a local directory that holds the model's config.json instead: "
            f"--config.{key}=DIR (e.g. `huggingface-cli download {path.partition('@')[0]} config.json --local-dir DIR` "
            f"where there is a network; configs/paper/models/ ships the paper models' config.json files)"
        ) from None


@functools.lru_cache(maxsize=None)
def _snapshot(hub_id: str, patterns: tuple[str, ...] = ALLOW_PATTERNS) -> str:
    """One download (or cache lookup) per id and process: the tokenizer, model and stops all ask."""
    from huggingface_hub import snapshot_download

    repo_id, _, revision = hub_id.partition("@")
    return snapshot_download(repo_id=repo_id, revision=revision or None, allow_patterns=list(patterns))
