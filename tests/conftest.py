"""Shared test setup."""

import os

import pytest

# The Triton kernels run on CPU tensors only under the interpreter, and triton decides that when a kernel is
# defined. pytest imports every test module into one process, so set it once here, before any module can
# import dsalign.kernels. A GPU run of the kernel tests can override it with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two torch threads on a shared 2-core box stall on each other; restore the setting for other modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
