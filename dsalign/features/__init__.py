"""Region proposals and pretrained-CNN region features (paper Eq. 1): image shards → feature shards.

Import the submodules directly (``dsalign.features.extract``, ``.regions``, ``.backbones``); the package
itself imports nothing heavy, so ``dsalign --help`` stays fast.
"""
