"""Refine facebook/deit-base-distilled-patch16-224 on ImageNet2012.

The distilled model's logits are the mean of its class- and distillation-token heads
(as transformers' DeiTForImageClassificationWithTeacher); refinement trains that mean
against the labels (no teacher network).
"""
from configs import default


def get_config():
  c = default.get_config()
  c.init_from = "hf:facebook/deit-base-distilled-patch16-224"
  c.model.update(name="B/16", distilled=True, ln_eps=1e-12)
  c.data.update(name="imagenet2012", train_split="train", eval_split="validation", preprocess="deit")
  c.num_epochs = 20
  return c
