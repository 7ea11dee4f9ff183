"""zeroshard: ZeRO-style sharded optimizer for PyTorch (stages 0-3) on torch.distributed."""
