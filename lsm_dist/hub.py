"""Hugging Face model ids (``org/name``, ``org/name@revision``) as merge inputs, the way every
public mergekit config names its models.

An id is resolved through ``huggingface_hub`` to a snapshot folder: the local HF cache first
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default), a download only when
the plan allows the network (``allow_download: true``) and ``HF_HUB_OFFLINE`` is not set. Only
safetensors weights, configs and tokenizer files are fetched (``allow_patterns``): never a pickle,
never model code (nothing fetched is executed: the folder is then read like any checkpoint).
A local path of the same spelling wins over an id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lsm_dist.config import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")
# what a checkpoint needs, nothing executable and no pickle
PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
            "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json"]


def is_hub_id(ref: str | Path) -> bool:
    """``ref`` is spelled as a Hub model id and no local path of that name exists."""
    s = str(ref)
    return bool(HUB_ID.match(s)) and not Path(s).exists() and not s.startswith((".", "/"))


def hub_cache() -> Path:
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def fetch_command(repo: str, revision: str | None) -> str:
    inc = " ".join(f"'{p}'" for p in PATTERNS[:4])
    return f"huggingface-cli download {repo}" + (f" --revision {revision}" if revision else "") + f" --include {inc}"


def resolve_hub_id(ref: str, allow_download: bool = False) -> Path:
    """The snapshot folder of a Hub id (module doc); ``ConfigError`` naming the id, the cache
    looked in and the command that fetches it when it is not there and downloads are off."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo, _, revision = str(ref).partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    local_only = offline or not allow_download
    cache = hub_cache()
    try:
        path = Path(snapshot_download(repo, revision=revision or None, cache_dir=str(cache),
                                      local_files_only=local_only, allow_patterns=PATTERNS))
    except (LocalEntryNotFoundError, FileNotFoundError):
        why = "HF_HUB_OFFLINE is set" if offline else "downloads are off (allow_download: false)"
        raise ConfigError(f"model {ref!r} is not in the Hugging Face cache {cache} and {why}: fetch it with "
                          f"`{fetch_command(repo, revision or None)}`, or set allow_download: true") from None
    except HFValidationError as e:
        raise ConfigError(f"model {ref!r}: not a valid Hugging Face id: {e}") from None
    except Exception as e:  # noqa: BLE001 -- network, auth, missing revision: one clear line
        raise ConfigError(f"model {ref!r}: cannot fetch it from the Hugging Face Hub: {type(e).__name__}: {e}") from None
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"model {ref!r}: the snapshot {path} holds no *.safetensors weights (only those are "
                          "read; pickle weights never are)")
    return path
