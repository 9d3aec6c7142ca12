"""Test session set-up: Triton runs interpreted on CPU tensors where no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before
any test module imports csfm_kernels.
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # for tests/helpers.py
