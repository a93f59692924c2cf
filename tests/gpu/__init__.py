"""What the GPU tests share: where they run (a CUDA card, or this CPU with
`T2I_GPU_TESTS_ON_CPU=1` for the checks that do not need CUDA) and their markers."""

import os

import pytest
import torch

ON_CPU = os.environ.get("T2I_GPU_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
# A GPU test module's `pytestmark`: skipped without CUDA unless asked to run on this CPU.
GPU_MODULE = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(), reason="needs CUDA"),
]
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="a CUDA-only check")
