"""Refine facebook/deit-base-distilled-patch16-224 on ImageNet2012.

As the authors' code (transformers' DeiTForImageClassification): the class-token head alone,
freshly initialised; the distillation token stays, its head is dropped. --config.model.deit_head=mean
keeps both pretrained heads and trains their mean (DeiTForImageClassificationWithTeacher).
"""
from configs import default


def get_config():
  c = default.get_config()
  c.init_from = "hf:facebook/deit-base-distilled-patch16-224"
  c.model.update(name="B/16", distilled=True, ln_eps=1e-12, deit_head="cls")
  # the authors' preprocessing: shorter side to 224, centre crop ("deit": crop from 256)
  c.data.update(name="imagenet2012", train_split="train", eval_split="validation",
                preprocess="deit_center")
  c.num_epochs = 20
  return c
