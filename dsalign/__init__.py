"""dsalign: deep visual-semantic alignments between image regions and words (Karpathy & Fei-Fei, CVPR 2015).

The library (data, models, ops, evaluation, inference API) imports without DeepSpeed or a compiled extension;
the trainer is a layer above it.
"""

# torch first: the compiled op library dsalign._C links against torch's shared libraries, which are only
# found once torch has loaded them.
import torch  # noqa: F401

__version__ = "0.1.0"
