"""`python -m zeroshard.train` / `torchrun ... -m zeroshard.train`: runs the demo job
(zeroshard/demo/train.py), kept at this short, documented name."""

from zeroshard.demo.train import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
