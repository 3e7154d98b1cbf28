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


def parse_flags(argv):
  """absl's parsing, with every mistake reported as one line (no traceback)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _die(str(e).splitlines()[0])
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a bad --config.<field>
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    msg = str(e).strip("\"'")
    _die(f"{' '.join(bad) or 'a --config override'}: the config has no such field or value "
         f"({msg}); see the fields in the config file")
  except OSError as e:
    _die(f"cannot load --config: {str(e).splitlines()[-1].strip()}")


def _die(msg: str):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  from lsvit import run as run_lib
  path = config_flags.get_config_filename(FLAGS["config"])
  if not os.path.isfile(path.split(":")[0]):
    _die(f"--config={path}: no such config file (e.g. --config=configs/digits.py)")
  try:
    config = FLAGS.config
    config.to_dict()  # a file that failed to load raises on first use
  except Exception as e:  # the config file's own error, in one line
    _die(f"cannot load --config={path}: {type(e).__name__}: {str(e).splitlines()[-1].strip()}")
  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]), config)
  return run_lib.main(config, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
