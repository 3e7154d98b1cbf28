"""The embedded default: scikit-learn's real 8x8 handwritten digits, offline, on CPU.

1,797 images (1,438 train / 359 validation), 10 classes; a 12-layer ViT of width 64
with 2x2 patches. Stage 1 trains a sequential baseline (the stand-in for a pretrained
model) and reports it collapsing under shuffled layers; stage 2 refines it with LayerShuffle.

The recipe was chosen by measurement: docs/recipes.md.
"""
from configs import default


def get_config():
  c = default.get_config()
  c.variant = "layershuffle"
  c.init_from = ""
  c.model.update(name="", width=64, depth=12, mlp_dim=128, num_heads=4, patch_size=2,
                 image_size=8, channels=1, num_classes=10, ln_eps=1e-6)
  c.compute_dtype = "float32"
  c.data.update(name="digits", eval_split="validation", preprocess="plain", flip=False,
                num_threads=2)
  c.batch_size = 64
  c.eval_batch_size = 120
  c.num_epochs = 60
  c.optimizer.lr = 1e-3
  c.log_every_steps = 5
  c.eval_orders = 10
  c.pretrain_epochs = 30           # stage 2 refines stage 1 (the paper's setting; see above)
  return c
