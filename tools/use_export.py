"""The README's demo: the exported digits model in `transformers` alone, in the original order,
in random orders and pruned (python tools/use_export.py [export/digits_hf])."""
import sys

import numpy as np
import torch
from transformers import AutoImageProcessor, ViTForImageClassification

from lsvit import data

where = sys.argv[1] if len(sys.argv) > 1 else "export/digits_hf"
model = ViTForImageClassification.from_pretrained(where).eval()
proc = AutoImageProcessor.from_pretrained(where)
val = data.digits("validation")
x = proc([val[i][0] for i in range(len(val))], input_data_format="channels_last",
         return_tensors="pt")["pixel_values"]
y = np.array([val[i][1] for i in range(len(val))])


def accuracy(order):
  layers = model.vit.layers
  model.vit.layers = torch.nn.ModuleList([layers[i] for i in order])
  with torch.no_grad():
    pred = model(pixel_values=x).logits.argmax(-1).numpy()
  model.vit.layers = layers
  return (pred == y).mean()


print(f"original order: {accuracy(range(12)):.2%}")
rng = np.random.default_rng(0)
print("5 random orders:", ", ".join(f"{accuracy(rng.permutation(12)):.2%}" for _ in range(5)))
print("6 layers kept:", f"{accuracy(sorted(rng.choice(12, 6, replace=False))):.2%}")
