import os

import pytest

import meshplan as mp


def _interpret_triton_without_cuda() -> None:
    """Triton kernels run on the CPU under its interpreter, which must be chosen before
    `meshplan.kernels` defines them (and before the tests import anything that does)."""
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_cuda()


@pytest.fixture(scope="session")
def h100_64():
    return mp.load_cluster("h100-sxm", gpus=64)


@pytest.fixture(scope="session")
def llama70b():
    return mp.load_model("llama3-70b")
