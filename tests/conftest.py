"""Without CUDA, Triton kernels run through the interpreter; it must be chosen before any kernel is
defined, so it is set here, before test modules import them."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
