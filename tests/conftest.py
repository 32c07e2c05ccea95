import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import make_model  # noqa: E402

# tiny models gain nothing from threads, and oversubscribed OpenMP barriers are very slow
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny random checkpoints (HF folders with tokenizer) and their transformers models."""
    out = {}
    for kind in ("llama", "qwen2", "qwen3", "sdar"):
        folder = tmp_path_factory.mktemp(kind)
        out[kind] = (folder, make_model(folder, kind))
    return out


@pytest.fixture(scope="session")
def llama_dir(model_dirs):
    return model_dirs["llama"][0]
