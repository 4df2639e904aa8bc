"""The benchmark scripts, each run as ``python -m benchmarks.NAME`` from the repository root (harness: common.py).

Benchmarks read local weights and images only: no Hugging Face Hub lookups (set before any script imports timm).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
