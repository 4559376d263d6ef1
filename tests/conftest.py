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


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """`dsalign demo` at a tiny scale, run once per session: (output folder, exit status, printed text).

    Its model/ folder (alignment + full and region caption bundles, barely trained) serves the API tests.
    """
    import contextlib
    import io

    from dsalign.cli import main

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["demo", "--out", str(out), "--n-train", "120", "--n-val", "20", "--n-test", "20",
                       "--steps", "10", "--caption-steps", "10", "--report-images", "3", "--quiet"])
    return out, status, printed.getvalue()
