"""The devices a test runs on: the CPU always, CUDA marked ``gpu`` and skipped without it."""
import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]
