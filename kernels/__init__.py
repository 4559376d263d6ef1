"""Triton kernels for dsalign (installed as the package ``dsalign.kernels``).

Importing this package needs ``triton``. To run the kernels on CPU tensors (tests), set
``TRITON_INTERPRET=1`` before triton or this package is first imported.
"""

from .maxsim import interpreted, maxsim_forward, maxsim_score

__all__ = ["interpreted", "maxsim_forward", "maxsim_score"]
