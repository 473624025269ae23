import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models run fastest on one thread; reference-model tests ask for two


@pytest.fixture(scope="session")
def reference():
    """(model, tokenizer) of the embedded reference model; tests copy it before changing it."""
    from rankdown.reference import load_reference

    return load_reference()
