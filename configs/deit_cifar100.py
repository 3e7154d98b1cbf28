"""Refine facebook/deit-base-distilled-patch16-224 on CIFAR-100 at 224 with a new 100-way head
(the class-token head, as deit_in1k; the authors kept a 1000-way head, lsvit sizes it to 100)."""
from configs import deit_in1k


def get_config():
  c = deit_in1k.get_config()
  c.model.num_classes = 100
  c.data.update(name="cifar100", train_split="train", eval_split="test")
  c.num_epochs = 100
  return c
