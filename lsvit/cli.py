"""The commands: ``lsvit-train``, ``lsvit-evaluate``, ``lsvit-convert``, ``lsvit-export`` (or
``python -m lsvit train|evaluate|convert|export``; ``train.py`` and ``evaluate.py`` at the
repository root call the same functions). A mistake in the input is one line on stderr and a
non-zero exit."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

TRAIN_USAGE = """Train or refine a LayerShuffle ViT.

  python train.py --config=configs/digits.py
  python train.py --config=configs/vit_in1k.py --config.variant=layershuffle --config.seed=1
  python train.py --config=configs/vit_cifar100.py --workdir=runs/my_run

Without --workdir the run goes to runs/<config>_<variant>_seed<seed>; re-running the
same command resumes from its latest checkpoint.
"""

EVALUATE_USAGE = """Evaluate trained runs: shuffled and pruned orders, merged models, ensembles,
position prediction, and the representation analysis of the paper.

  python evaluate.py --mode arbitrary --workdir runs/digits_layershuffle_seed0
  python evaluate.py --mode merge --workdir 'runs/vit_in1k_layershuffle_seed*'
  python evaluate.py --mode all --workdir runs/*seed* --out results/
"""


def _die(msg: str, code: int = 2):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(code)


# ----------------------------------------------------------------------------- train

def default_workdir(config_path: str, config) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  keep = f"_keep{config.keep_layers}" if config.keep_layers else ""
  return os.path.join("runs", f"{name}_{config.variant}{keep}_seed{config.seed}")


def train(config, workdir: str) -> int:
  """Runs ``train_lib.train``; a user's mistake is one line and exit code 1."""
  from lsvit import checkpoint, convert, data, train_lib
  train_lib.quiet_logs()
  try:
    train_lib.train(config, workdir)
  except (ValueError, FileExistsError, FileNotFoundError, data.DataError,
          checkpoint.CheckpointError, convert.ConversionError, train_lib.TrainingDiverged) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def _define_train_flags():
  from absl import flags
  from ml_collections import config_flags
  if "config" in flags.FLAGS:  # defined by an earlier call in this process
    return
  config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/digits.py",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None,
                      "run directory (default: runs/<config>_<variant>_seed<seed>)")


def _parse_train_flags(argv):
  """absl's parsing, with every mistake reported as one line (no traceback)."""
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _die(str(e).splitlines()[0])
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a bad --config.<field>
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    msg = str(e).strip("\"'")
    _die(f"{' '.join(bad) or 'a --config override'}: the config has no such field or value "
         f"({msg}); see the fields in the config file")
  except OSError as e:
    _die(f"cannot load --config: {str(e).splitlines()[-1].strip()}")
  except ImportError as e:  # the config file's own imports
    hint = ""
    if e.name and e.name.split(".")[0] == "configs":
      hint = ("; a config imports its base as `from configs import default`: run from the "
              "directory that holds configs/, or put that directory on PYTHONPATH")
    _die(f"cannot load --config: {e}{hint}")
  if flags.FLAGS["config"].value is None:
    _die("--config is required (e.g. --config=configs/digits.py)")
  return rest


def _train_from_flags(argv):
  del argv
  from absl import flags
  from ml_collections import config_flags
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  if not os.path.isfile(path.split(":")[0]):
    _die(f"--config={path}: no such config file (e.g. --config=configs/digits.py)")
  try:
    config = flags.FLAGS.config
    config.to_dict()  # a file that failed to load raises on first use
  except Exception as e:  # the config file's own error, in one line
    _die(f"cannot load --config={path}: {type(e).__name__}: {str(e).splitlines()[-1].strip()}")
  return train(config, flags.FLAGS.workdir or default_workdir(path, config))


def train_main(argv: Optional[List[str]] = None):
  from absl import app
  _define_train_flags()
  sys.modules["__main__"].__doc__ = TRAIN_USAGE  # absl's --help prints the main module's doc
  app.run(_train_from_flags, argv=argv, flags_parser=_parse_train_flags)


# ----------------------------------------------------------------------------- evaluate

def positive(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
  if value <= 0:
    raise argparse.ArgumentTypeError(f"{value} must be at least 1")
  return value


def merge_base(text: str) -> str:
  if text == "random" or text.isdigit():
    return text
  raise argparse.ArgumentTypeError(f"{text!r}: give a run index (0, 1, ...) or 'random'")


def evaluate_parser() -> argparse.ArgumentParser:
  from lsvit import evaluators
  ap = argparse.ArgumentParser(description=EVALUATE_USAGE,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mode", required=True, help="one of: " + ", ".join(evaluators.MODES))
  ap.add_argument("--workdir", nargs="+", required=True, help="training workdirs or globs")
  ap.add_argument("--out", help="output directory (default: <first workdir>/eval)")
  ap.add_argument("--orders", type=positive,
                  help="arbitrary order: passes over the eval split, a fresh order per batch")
  ap.add_argument("--prune_k", type=positive, nargs="+", help="prune: layers kept")
  ap.add_argument("--prune_method", choices=["random", "even", "first"])
  ap.add_argument("--prune_draws", type=positive, help="prune: random subsets per batch position")
  ap.add_argument("--merges", type=positive, help="merge: merged models to build")
  ap.add_argument("--merge_base", type=merge_base,
                  help="merge: run index supplying embedding/tokens/head, or 'random'")
  ap.add_argument("--allow_repeats", action="store_true", default=None,
                  help="merge from fewer runs than layers")
  ap.add_argument("--layer", type=int, help="analysis: the layer to follow")
  ap.add_argument("--images", type=positive, help="analysis: number of images")
  ap.add_argument("--batch_size", type=positive,
                  help="eval batch (default: the runs' eval_batch_size)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no_progress", action="store_true")
  return ap


# command-line flag -> evaluator keyword; each evaluator is given the ones it takes
EVALUATE_FLAGS = {"orders": "orders", "prune_k": "ks", "prune_method": "method",
                  "prune_draws": "draws", "merges": "merges", "merge_base": "base",
                  "allow_repeats": "allow_repeats", "layer": "layer", "images": "images"}


def evaluate(argv: Optional[List[str]] = None) -> int:
  from lsvit import checkpoint, data, evaluators, train_lib
  args = evaluate_parser().parse_args(argv)
  train_lib.quiet_logs()
  given = {flag: getattr(args, flag) for flag in EVALUATE_FLAGS if getattr(args, flag) is not None}
  options = {EVALUATE_FLAGS[flag]: value for flag, value in given.items()}
  if args.mode in evaluators.EVALUATORS:
    takes = evaluators.EVALUATORS[args.mode].options()
    wrong = [f"--{flag}" for flag in given if EVALUATE_FLAGS[flag] not in takes]
    if wrong:
      flags_taken = [f"--{f}" for f, kw in EVALUATE_FLAGS.items() if kw in takes]
      print(f"error: {', '.join(wrong)} does not apply to --mode {args.mode} (its options: "
            f"{', '.join(flags_taken) or 'none'})", file=sys.stderr)
      return 1
  try:
    evaluators.run(args.workdir, {args.mode: options}, args.out, args.batch_size, args.seed,
                   not args.no_progress)
  except (evaluators.EvalError, checkpoint.CheckpointError, data.DataError, ValueError,
          OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def evaluate_main(argv: Optional[List[str]] = None):
  code = evaluate(argv)
  from lsvit import checkpoint
  checkpoint.exit_process(code)


def convert_main(argv: Optional[List[str]] = None):
  from lsvit import convert
  sys.exit(convert.main(argv))


def export_main(argv: Optional[List[str]] = None):
  from lsvit import export
  from lsvit import checkpoint
  checkpoint.exit_process(export.main(argv))


COMMANDS = {"train": train_main, "evaluate": evaluate_main, "convert": convert_main,
            "export": export_main}


def main(argv: Optional[List[str]] = None):
  """``python -m lsvit COMMAND ...``."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    _die(f"usage: python -m lsvit {{{'|'.join(COMMANDS)}}} ... (e.g. python -m lsvit train "
         f"--config=configs/digits.py)")
  command = argv.pop(1)
  if command == "train":
    train_main([f"lsvit {command}"] + argv[1:])
  else:
    COMMANDS[command](argv[1:])
