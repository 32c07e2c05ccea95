"""Default sampling settings of a model, from its `generation_config.json` (as vLLM's
`--generation-config`): `auto` reads the model folder's file, `vllm` ignores it, a path names a
file or a folder holding one. Requests and command-line flags override these defaults."""

import json
from pathlib import Path
from typing import Any

GENERATION_CONFIG_FILE = "generation_config.json"
# what a request gets when neither it nor the model's file sets a field: greedy under `auto`
# (the CLI, the API and the playground agree), the OpenAI API's temperature 1 under `vllm`
BUILTIN_DEFAULTS = {"auto": {"temperature": 0.0}, "vllm": {"temperature": 1.0}}
# generation_config.json key -> SamplingParams field
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_new_tokens": "max_tokens"}


def sampling_defaults(source: str, model_folder: Path) -> dict[str, Any]:
    """SamplingParams fields for requests that set none: `source` is auto, vllm or a path."""
    if source == "vllm":
        return dict(BUILTIN_DEFAULTS["vllm"])
    if source == "auto":
        path = model_folder / GENERATION_CONFIG_FILE
        if not path.is_file():
            return dict(BUILTIN_DEFAULTS["auto"])
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / GENERATION_CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"generation config {source!r} is neither auto, vllm, a {GENERATION_CONFIG_FILE} file "
                             f"nor a folder holding one")
    return BUILTIN_DEFAULTS["auto"] | read_generation_config(path)


def read_generation_config(path: Path) -> dict[str, Any]:
    """The sampling fields the file sets; the engine checks their values."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the generation config {path} ({e}); fix it or pass --generation-config "
                         f"vllm") from e
    if not isinstance(raw, dict):
        raise ValueError(f"generation config {path} must be a JSON object")
    found = {field: raw[key] for key, field in FIELDS.items() if raw.get(key) is not None}
    if raw.get("do_sample") is False:  # transformers' greedy, whatever temperature the file also names
        found["temperature"] = 0.0
    return found
