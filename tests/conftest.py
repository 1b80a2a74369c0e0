import os

import pytest
import torch

HEAD_DIMS = (64, 96, 128, 256)
BITS = (2, 3, 4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def reference_mode(monkeypatch):
    """Run the public ops on the torch reference (CPU fallback) instead of the Triton interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
