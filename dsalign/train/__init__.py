"""The trainer layer (DeepSpeed, checkpoints, logging) above the library; importing it does not import
DeepSpeed, which loads only when a training run starts."""
