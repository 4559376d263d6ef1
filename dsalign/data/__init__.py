"""Data sets, readers, shard writing and the training/evaluation input pipelines."""
