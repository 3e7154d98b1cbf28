"""Train or refine a LayerShuffle ViT: ``python train.py --config=configs/digits.py``.

The same command as ``lsvit-train`` / ``python -m lsvit train`` (see ``lsvit/cli.py``).
"""
from lsvit import cli

if __name__ == "__main__":
  cli.train_main()
