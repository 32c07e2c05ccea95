import os

os.environ["HF_HUB_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # under pytest-xdist (README: -n 2) the workers already fill the cores: the processes a test
    # starts (servers, trainers, tensor-parallel ranks) get one OpenMP thread each as well
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import make_model  # noqa: E402

# tiny models gain nothing from threads, and oversubscribed OpenMP barriers are very slow
torch.set_num_threads(1)

# idlm's CPU kernels, built (once, ~1 minute) into the real cache before any test points
# $IDLM_CACHE at a temporary folder
from idlm.kernels.cpu_kernels import cpu_kernels  # noqa: E402

cpu_kernels()


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


@pytest.fixture(scope="module")
def offline(model_dir):
    """The offline engine on the module's `model_dir`, to compare a served answer with."""
    from idlm import LLM

    return LLM(str(model_dir), progress=False, kv_cache_tokens=4096)


@pytest.fixture
def client(server):
    """The official OpenAI client on the module's `server` (a server_helpers.Server)."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
