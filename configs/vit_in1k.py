"""Refine google/vit-base-patch16-224 on ImageNet2012 (tfds imagenet2012, manual download).

python train.py --config=configs/vit_in1k.py --config.variant=layershuffle --config.seed=0
The sequential baseline refines 1 epoch: --config.variant=baseline --config.num_epochs=1
"""
from configs import default


def get_config():
  c = default.get_config()
  c.init_from = "hf:google/vit-base-patch16-224"
  c.model.update(name="B/16", distilled=False, ln_eps=1e-12)
  # the authors' preprocessing: shorter side to 224, centre crop ("vit": squash to 224)
  c.data.update(name="imagenet2012", train_split="train", eval_split="validation",
                preprocess="vit_center")
  c.num_epochs = 20
  return c
