"""Shared test setup."""

import os

# The Triton kernels run on CPU tensors only under the interpreter, and triton decides that when a kernel is
# defined. pytest imports every test module into one process, so set it once here, before any module can
# import dsalign.kernels. A GPU run of the kernel tests can override it with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
