"""Evaluation (paper Tables 1-2). Import the submodule you need; see docs/evaluation.md.

- ``dsalign.eval.retrieval``: R@1/5/10 and median rank both ways, COCO 1K and 5K protocols (numpy + torch only).
- ``dsalign.eval.captions``: BLEU-1..4, METEOR, ROUGE-L, CIDEr through pycocoevalcap (the ``eval`` extra; Java for
  the official tokenizer and METEOR), and the novelty of generated captions.
"""
