"""idlm's own disk cache, `$IDLM_CACHE` (default ~/.cache/idlm): GGUF conversions under gguf/
(one entry per file content), random-weight shapes under shapes/ and the built CPU kernels under
kernels/ (one entry per torch version). What `idlm cache` lists and removes."""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

KINDS = ("gguf", "shapes", "kernels")
SOURCE_FILE = "idlm_source.json"  # in a GGUF entry: the file it was made from


def cache_root() -> Path:
    return Path(os.environ.get("IDLM_CACHE") or Path.home() / ".cache" / "idlm")


@dataclass(frozen=True, slots=True)
class CacheEntry:
    path: Path
    kind: str
    size: int  # bytes on disk
    holds: str  # what it holds, in words
    source: str | None  # the GGUF file it was made from, where recorded

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.path.name}"


def entries() -> list[CacheEntry]:
    root = cache_root()
    found = []
    for kind in KINDS:
        folder = root / kind
        if folder.is_dir():
            found += [describe(path, kind) for path in sorted(folder.iterdir()) if path.is_dir()
                      and not path.name.startswith(".")]
    return found


def describe(path: Path, kind: str) -> CacheEntry:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    if kind == "shapes":
        return CacheEntry(path, kind, size, "a random-weight shape (config only)", None)
    if kind == "kernels":
        return CacheEntry(path, kind, size, "idlm's CPU kernels, built (made again on next use)", None)
    holds = [sub.name for sub in sorted(path.iterdir()) if (sub / "model.safetensors").is_file()]
    if (path / "idlm-quantized").is_dir():
        holds.insert(0, "quantized blocks")
    source = None
    try:
        source = json.loads((path / SOURCE_FILE).read_text())["gguf"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if (path / "model.safetensors").is_file():  # the layout before issue 20: float32 beside the config
        holds.append("float32 (old layout, keyed by path)")
    return CacheEntry(path, kind, size, ", ".join(["config, tokenizer", *holds]), source)


def remove(names: list[str]) -> list[CacheEntry]:
    """Removes the entries named as `idlm cache ls` prints them (kind/name, or just the name)."""
    known = {e.name: e for e in entries()}
    by_short = {e.path.name: e for e in known.values()}
    chosen = []
    for name in names:
        entry = known.get(name) or by_short.get(name)
        if entry is None:
            raise ValueError(f"no cache entry {name!r}; `idlm cache ls` lists them")
        chosen.append(entry)
    for entry in chosen:
        shutil.rmtree(entry.path)
    return chosen
