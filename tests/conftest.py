import os

import pytest
import torch

# Without a GPU the kernels run in Triton's interpreter. Set before any nqkernels import (triton.jit reads it then),
# so a plain `pytest` on a CPU machine never replaces the kernels by the torch reference they are compared with.
if not torch.cuda.is_available():
    if os.environ.get("TRITON_INTERPRET", "1") != "1":
        raise pytest.UsageError("TRITON_INTERPRET is set to something other than 1 on a machine without CUDA: the "
                                "Triton kernels would not run, only their torch reference. Unset it or set it to 1.")
    os.environ["TRITON_INTERPRET"] = "1"

HEAD_DIMS = (64, 96, 128, 256)
# The quality fixture (a small trained Llama and held-out texts), beside the repository; NQ_FIXTURE_DIR elsewhere.
FIXTURE = os.environ.get("NQ_FIXTURE_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures"))
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


def compile_for_hopper(script: str) -> str:
    """Run ``script`` (it compiles kernels for sm_90 with ``triton.compile``) in a fresh interpreter without
    TRITON_INTERPRET, so the NVIDIA backend compiles them; its stdout. Skips where triton has no NVIDIA backend."""
    import subprocess
    import sys

    import triton

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
