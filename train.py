"""Train or refine a LayerShuffle ViT.

  python train.py --config=configs/digits.py
  python train.py --config=configs/vit_in1k.py --config.variant=layershuffle --config.seed=1
  python train.py --config=configs/vit_cifar100.py --workdir=runs/my_run

Without --workdir the run goes to runs/<config>_<variant>_seed<seed>; re-running the
same command resumes from its latest checkpoint.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/digits.py",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (default: runs/<config>_<variant>_seed<seed>)")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def default_workdir(config_path, config):
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  keep = f"_keep{config.keep_layers}" if config.get("keep_layers") else ""
  return os.path.join("runs", f"{name}_{config.variant}{keep}_seed{config.seed}")


def main(argv):
  del argv
  from lsvit import run as run_lib
  config = FLAGS.config
  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]), config)
  return run_lib.main(config, workdir)


if __name__ == "__main__":
  app.run(main)
