"""Hugging Face hub ids (`HuggingFaceTB/SmolLM2-135M-Instruct`) as model folders: the snapshot in
the local Hugging Face cache, downloaded only when the hub is allowed (HF_HUB_OFFLINE=0)."""

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# what idlm reads from a repository: config, tokenizer, chat template, safetensors weights
DOWNLOADED = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def is_hub_id(model: str) -> bool:
    return HUB_ID.fullmatch(model) is not None and not model.endswith(".gguf")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_folder(repo_id: str) -> Path:
    """The cached snapshot of repo_id (its default branch); raises ValueError when it is absent."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if hub_offline():
        raise ValueError(f"model {repo_id!r} is neither a local path nor in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}); download it with `hf download {repo_id}`, or set "
                         f"HF_HUB_OFFLINE=0 to let idlm download it")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOADED))
    except (HfHubHTTPError, OSError) as e:
        raise ValueError(f"cannot download {repo_id!r} from the Hugging Face hub ({e}); check the id, "
                         f"your network and HF_TOKEN for gated models") from e
