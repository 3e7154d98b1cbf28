"""The embedded default: scikit-learn's real 8x8 handwritten digits, offline, on CPU.

1,797 images (1,437 train / 360 validation), 10 classes; a 12-layer ViT of width 64
with 2x2 patches. Stage 1 trains a sequential baseline (the stand-in for a pretrained
model) and reports it collapsing under shuffled layers; stage 2 trains LayerShuffle.
See RECIPE below for how stage 2 was chosen.
"""
import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.variant = "layershuffle"
  c.init_from = ""
  c.model = ml_collections.ConfigDict(dict(
      width=64, depth=12, mlp_dim=128, num_heads=4, patch_size=2, image_size=8, channels=1,
      num_classes=10, distilled=False, dropout=0.0, attn_dropout=0.0, ln_eps=1e-6, impl="gather",
      attention="xla", remat=False))
  c.compute_dtype = "float32"
  c.data = ml_collections.ConfigDict(dict(
      name="digits", data_dir="", train_split="train", eval_split="validation", preprocess="plain",
      augment=False, crop_scale=(0.08, 1.0), flip=False, prepare=False, num_threads=2, dir=""))
  c.batch_size = 64
  c.eval_batch_size = 120
  c.num_epochs = 40
  c.optimizer.update(lr=1e-3, schedule="linear", warmup_steps=0, grad_clip_norm=1.0)
  c.log_every_steps = 5
  c.eval_orders = 10
  # Stage 1 (sequential "pretraining"), run into <workdir>/pretrain when >0.
  c.pretrain_epochs = 30
  c.pretrain_lr = 1e-3
  c.refine_from_pretrain = False   # stage 2 starts from scratch (see the recipe measurement)
  return c
