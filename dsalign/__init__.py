"""dsalign: deep visual-semantic alignments between image regions and words (Karpathy & Fei-Fei, CVPR 2015).

The library (data, models, ops, evaluation, inference API) imports without DeepSpeed or a compiled extension;
the trainer is a layer above it.
"""

__version__ = "0.1.0"
