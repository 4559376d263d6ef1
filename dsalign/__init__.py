"""dsalign: deep visual-semantic alignments between image regions and words (Karpathy & Fei-Fei, CVPR 2015).

The library (data, models, ops, evaluation, inference API) imports without DeepSpeed or a compiled extension;
the trainer is a layer above it.
"""

# torch first: the compiled op library dsalign._C links against torch's shared libraries, which are only
# found once torch has loaded them.
import torch  # noqa: F401

__version__ = "0.1.0"


def load(path, device=None, regions=None):  # noqa: ANN001, ANN201 - the typed signature is dsalign.api.load
    """Load a bundle or a folder of bundles for inference: see :func:`dsalign.api.load`.

    Imported lazily, so ``import dsalign`` stays light (no torchvision/OpenCV until a model is loaded).
    """
    from dsalign.api import load as _load

    return _load(path, device, regions)
