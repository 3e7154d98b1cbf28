"""Evaluate trained runs: shuffled and pruned orders, merged models, ensembles,
position prediction, and the representation analysis of the paper.

  python evaluate.py --mode arbitrary --workdir runs/digits_layershuffle_seed0
  python evaluate.py --mode merge --workdir 'runs/vit_in1k_layershuffle_seed*'
  python evaluate.py --mode all --workdir runs/*seed* --out results/
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def positive(text):
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
  if value <= 0:
    raise argparse.ArgumentTypeError(f"{value} must be at least 1")
  return value


def merge_base(text):
  if text == "random" or (text.isdigit()):
    return text
  raise argparse.ArgumentTypeError(f"{text!r}: give a run index (0, 1, ...) or 'random'")


def parse(argv=None):
  from lsvit.evaluate_lib import MODES
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mode", required=True, help="one of: " + ", ".join(MODES))
  ap.add_argument("--workdir", nargs="+", required=True, help="training workdirs or globs")
  ap.add_argument("--out", help="output directory (default: <first workdir>/eval)")
  ap.add_argument("--orders", type=positive, default=5,
                  help="arbitrary order: passes over the eval split, a fresh order per batch")
  ap.add_argument("--prune_k", type=positive, nargs="+", default=[3, 6, 9, 12], help="layers kept")
  ap.add_argument("--prune_method", default="random", choices=["random", "even", "first"])
  ap.add_argument("--prune_draws", type=positive, default=5, help="random subsets per batch position")
  ap.add_argument("--merges", type=positive, default=100, help="merged models to build")
  ap.add_argument("--merge_base", default="random", type=merge_base,
                  help="run index supplying embedding/tokens/head, or 'random' per merged model")
  ap.add_argument("--allow_repeats", action="store_true", help="merge from fewer runs than layers")
  ap.add_argument("--layer", type=int, default=0, help="analysis: the layer to follow")
  ap.add_argument("--images", type=positive, default=1000, help="analysis: number of images")
  ap.add_argument("--batch_size", type=positive, help="eval batch (default: the runs' eval_batch_size)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no_progress", action="store_true")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  from lsvit import checkpoint, data, evaluate_lib
  from lsvit.run import quiet_logs
  quiet_logs()
  try:
    evaluate_lib.run(args.workdir, args.mode, args.out, args.batch_size, args.seed,
                     not args.no_progress, orders=args.orders, ks=args.prune_k,
                     method=args.prune_method, draws=args.prune_draws, merges=args.merges,
                     base=args.merge_base, allow_repeats=args.allow_repeats, layer=args.layer,
                     images=args.images)
  except (evaluate_lib.EvalError, checkpoint.CheckpointError, data.DataError, ValueError,
          OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  code = main()
  if code:  # after a failed restore Orbax's reader threads print tracebacks as Python exits
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)
  sys.exit(code)
