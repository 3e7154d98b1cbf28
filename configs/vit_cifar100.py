"""Refine google/vit-base-patch16-224 on CIFAR-100 at 224 with a new 100-way head.

LayerShuffle variants: 100 epochs (default); sequential baseline: --config.variant=baseline --config.num_epochs=20
"""
from configs import vit_in1k


def get_config():
  c = vit_in1k.get_config()
  c.model.num_classes = 100
  c.data.update(name="cifar100", train_split="train", eval_split="test")
  c.num_epochs = 100
  return c
