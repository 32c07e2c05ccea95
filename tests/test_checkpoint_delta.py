"""scripts/checkpoint_delta.py rebuilds a fine-tuned checkpoint bit for bit from its base and a delta."""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "checkpoint_delta.py"


@pytest.fixture(scope="module")
def delta():
    spec = importlib.util.spec_from_file_location("checkpoint_delta", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {"proj.weight": torch.randn(6, 8, generator=g) * 0.05, "embed.weight": torch.randn(5, 8, generator=g)}
    base["proj.weight"][0, 0] = 1e-4  # the fine-tuned value below crosses zero: its bit pattern jumps
    fine = {k: (v + torch.randn(v.shape, generator=g) * 1e-3).to(torch.bfloat16) for k, v in base.items()}
    fine["proj.weight"][0, 0] = -2e-4
    fine["embed.weight"] = torch.cat([fine["embed.weight"], torch.randn(1, 8, dtype=torch.bfloat16)])  # a MASK row
    fine["head.bias"] = torch.randn(3)  # not in the base: stored whole
    base_dir, fine_dir = tmp_path / "base", tmp_path / "fine"
    for folder, weights in ((base_dir, base), (fine_dir, fine)):
        folder.mkdir()
        save_file(weights, str(folder / "model.safetensors"))
    (fine_dir / "config.json").write_text('{"mask_token_id": 5}')
    (fine_dir / "trainer_state.pt").write_text("optimizer state stays behind")
    return base_dir, fine_dir


def test_pack_unpack_is_bit_exact(delta, tmp_path):
    base_dir, fine_dir = _folders(tmp_path)
    delta.pack(fine_dir, str(base_dir), tmp_path / "parts", part_mib=0.00005)
    parts = sorted((tmp_path / "parts").glob("delta.*"))
    assert len(parts) > 1
    delta.unpack(tmp_path / "parts", str(base_dir), tmp_path / "rebuilt")
    want = load_file(str(fine_dir / "model.safetensors"))
    got = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    assert set(want) == set(got)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name
    assert (tmp_path / "rebuilt" / "config.json").read_text() == '{"mask_token_id": 5}'
    assert not (tmp_path / "rebuilt" / "trainer_state.pt").exists()


def test_unpack_refuses_another_base_and_missing_parts(delta, tmp_path):
    base_dir, fine_dir = _folders(tmp_path)
    delta.pack(fine_dir, str(base_dir), tmp_path / "parts", part_mib=0.00005)
    other = tmp_path / "other"
    other.mkdir()
    weights = load_file(str(base_dir / "model.safetensors"))
    weights["proj.weight"] = weights["proj.weight"] + 0.01
    save_file(weights, str(other / "model.safetensors"))
    with pytest.raises(SystemExit, match="sha256"):
        delta.unpack(tmp_path / "parts", str(other), tmp_path / "wrong")
    (tmp_path / "parts" / "delta.001").unlink()
    with pytest.raises(SystemExit, match="lacks parts delta.001"):
        delta.unpack(tmp_path / "parts", str(base_dir), tmp_path / "partial")
    with pytest.raises(SystemExit, match="--base"):
        delta.pack(fine_dir, str(tmp_path / "nowhere"), tmp_path / "p2", part_mib=1)
