"""Move a fine-tuned checkpoint as an exact, compressed delta against the base it was trained from.

A full conversion of SmolLM2-135M is 270 MB in bfloat16, more than the GPU machine can send back
in one call. Its weights moved only a few units in the last place from the base's, so
`pack` stores each tensor's bit pattern minus the base's (cast to the checkpoint's dtype) as
zigzag integers, split into byte planes and compressed with lzma; `unpack` rebuilds the folder
bit for bit (every tensor's sha256 is checked) on a machine that has the same base.

    python scripts/checkpoint_delta.py pack runs/smollm2-idlm/final --base MODEL -o /tmp/delta
    python scripts/checkpoint_delta.py unpack /tmp/delta --base MODEL -o runs/smollm2-idlm/final

MODEL is anything --model takes (a GGUF file, an HF folder). Parts are at most --part-mib each.
Rows past the base's (a new MASK embedding row) and tensors the base lacks are stored whole.
"""

import argparse
import hashlib
import io
import json
import lzma
import os
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from idlm.models.loader import resolve_model_folder, safetensors_files

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
SKIP = {WEIGHTS, "trainer_state.pt", "COMPLETE"}
CHUNK = 8 << 20
INT = {1: torch.int8, 2: torch.int16, 4: torch.int32}
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _base_weights(model: str) -> dict[str, torch.Tensor]:
    try:
        files = safetensors_files(resolve_model_folder(model))
    except ValueError as e:
        sys.exit(f"--base: {e}")
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT[t.element_size()])


def _base_part(name: str, t: torch.Tensor, base: dict[str, torch.Tensor]) -> torch.Tensor | None:
    b = base.get(name)
    if b is None or b.dim() != t.dim() or b.shape[1:] != t.shape[1:] or t.dim() == 0:
        return None
    rows = min(b.shape[0], t.shape[0])
    return b[:rows].to(t.dtype)


def _zigzag(d: torch.Tensor) -> np.ndarray:
    width = d.element_size() * 8
    z = (d << 1) ^ (d >> (width - 1))  # small magnitudes of either sign -> small unsigned numbers
    return z.numpy().view(UINT[d.element_size()])


def _unzigzag(z: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    z = torch.from_numpy(z.copy()).view(dtype)
    width = z.element_size() * 8
    logical = (z >> 1) & ((1 << (width - 1)) - 1)  # arithmetic shift, masked to a logical one
    return logical ^ -(z & 1)


def _planes(z: np.ndarray) -> bytes:
    width = z.dtype.itemsize
    return b"".join(z.view(np.uint8).reshape(-1, width)[:, i].tobytes() for i in range(width))


def _from_planes(raw: bytes, width: int, count: int) -> np.ndarray:
    planes = np.frombuffer(raw, np.uint8).reshape(width, count)
    return np.ascontiguousarray(planes.T).view(UINT[width]).reshape(-1)


def _compress(chunk: bytes) -> bytes:
    return lzma.compress(chunk, preset=6)  # releases the GIL, so threads compress in parallel


def pack(folder: Path, base_model: str, out: Path, part_mib: float) -> None:
    fine = load_file(str(folder / WEIGHTS))
    base = _base_weights(base_model)
    entries, blobs = [], []
    for name, t in fine.items():
        b = _base_part(name, t, base)
        entry = dict(name=name, dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), sha256=_sha(t))
        if b is not None and t.element_size() in INT:
            rows = b.shape[0]
            delta = _bits(t[:rows]) - _bits(b)  # wraps; unpack adds it back with the same wrap
            blobs.append(_planes(_zigzag(delta.reshape(-1))))
            entry.update(delta_rows=rows, delta_bytes=len(blobs[-1]))
            if rows < t.shape[0]:
                blobs.append(t[rows:].contiguous().view(torch.uint8).numpy().tobytes())
                entry["tail_bytes"] = len(blobs[-1])
        else:
            blobs.append(t.contiguous().view(torch.uint8).numpy().tobytes())
            entry["raw_bytes"] = len(blobs[-1])
        entries.append(entry)
    stream = b"".join(blobs)
    chunks = [stream[i:i + CHUNK] for i in range(0, len(stream), CHUNK)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        packed = list(pool.map(_compress, chunks))
    files = io.BytesIO()
    with tarfile.open(fileobj=files, mode="w:gz") as tar:
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.name not in SKIP:
                tar.add(f, arcname=f.name)
    whole = b"".join(packed)
    part = int(part_mib * (1 << 20))
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(whole), part):
        parts.append(f"delta.{len(parts):03d}")
        (out / parts[-1]).write_bytes(whole[i:i + part])
    (out / "files.tgz").write_bytes(files.getvalue())
    manifest = dict(tensors=entries, chunks=[len(c) for c in packed], parts=parts, stream_bytes=len(stream))
    (out / MANIFEST).write_text(json.dumps(manifest))
    print(f"{len(entries)} tensors, {len(stream) / 2**20:.1f} MiB of deltas -> {len(whole) / 2**20:.1f} MiB "
          f"in {len(parts)} parts of at most {part_mib} MiB, in {out}")


def unpack(parts_dir: Path, base_model: str, out: Path) -> None:
    manifest = json.loads((parts_dir / MANIFEST).read_text())
    missing = [p for p in manifest["parts"] if not (parts_dir / p).is_file()]
    if missing:
        sys.exit(f"{parts_dir} lacks parts {', '.join(missing)}; copy every part beside {MANIFEST}")
    whole = b"".join((parts_dir / p).read_bytes() for p in manifest["parts"])
    stream, at = [], 0
    for size in manifest["chunks"]:
        stream.append(lzma.decompress(whole[at:at + size]))
        at += size
    stream = b"".join(stream)
    base = _base_weights(base_model)
    weights, at = {}, 0
    for e in manifest["tensors"]:
        dtype, shape = getattr(torch, e["dtype"]), e["shape"]
        if "raw_bytes" in e:
            t = torch.frombuffer(bytearray(stream[at:at + e["raw_bytes"]]), dtype=torch.uint8).view(dtype)
            at += e["raw_bytes"]
        else:
            b = _base_part(e["name"], torch.empty(shape, dtype=dtype, device="meta"), base)
            if b is None or b.shape[0] != e["delta_rows"]:
                sys.exit(f"the base has no {e['name']} of the packed shape; unpack with the base that packed it")
            width = b.element_size()
            z = _from_planes(stream[at:at + e["delta_bytes"]], width, b.numel())
            at += e["delta_bytes"]
            t = (_bits(b).reshape(-1) + _unzigzag(z, INT[width])).view(dtype)
            if "tail_bytes" in e:
                tail = torch.frombuffer(bytearray(stream[at:at + e["tail_bytes"]]), dtype=torch.uint8).view(dtype)
                at += e["tail_bytes"]
                t = torch.cat([t, tail])
        t = t.reshape(shape)
        if _sha(t) != e["sha256"]:
            sys.exit(f"{e['name']} does not match its packed sha256; the base differs from the one that packed it")
        weights[e["name"]] = t
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(parts_dir / "files.tgz") as tar:
        tar.extractall(out, filter="data")
    save_file(weights, str(out / WEIGHTS))
    (out / "COMPLETE").write_text("unpacked\n")
    print(f"{len(weights)} tensors rebuilt bit for bit in {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="checkpoint folder -> delta parts")
    a.add_argument("folder", type=Path)
    a.add_argument("--base", required=True, help="the model the checkpoint was trained from")
    a.add_argument("-o", "--output", type=Path, required=True)
    a.add_argument("--part-mib", type=float, default=15.5, help="largest part, in MiB (default 15.5)")
    b = sub.add_parser("unpack", help="delta parts -> checkpoint folder")
    b.add_argument("parts", type=Path)
    b.add_argument("--base", required=True)
    b.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    if args.command == "pack":
        if args.part_mib <= 0:
            sys.exit(f"--part-mib must be above 0, got {args.part_mib}")
        if not (args.folder / WEIGHTS).is_file():
            sys.exit(f"{args.folder} has no {WEIGHTS}; pass a full checkpoint folder (not a LoRA adapter)")
        pack(args.folder, args.base, args.output, args.part_mib)
    else:
        if not (args.parts / MANIFEST).is_file():
            sys.exit(f"{args.parts} has no {MANIFEST}; pass the folder pack wrote")
        unpack(args.parts, args.base, args.output)


if __name__ == "__main__":
    main()
