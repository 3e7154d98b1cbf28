"""The paper's experiment grid at small scale, in one resumable command.

  python -m tools.reproduce --preset digits            # ~50 min on 2 CPU cores
  python -m tools.reproduce --preset tiny --out /tmp/r  # a 2-minute smoke run

(from the repository root: the grid's configs are ``configs/``).

Every run is an ordinary ``train.py`` workdir under ``--out`` (a finished run has a
``summary.json`` and is skipped when the command is re-run; an interrupted one resumes
from its checkpoint). Runs go to ``--workers`` processes, each pinned to its own CPU
cores (these models are too small for one process to keep two cores busy; BENCHMARKS.md).
The evaluators then produce the paper's tables and figures and ``tools/report.py`` writes
``RESULTS.md`` from their JSON, beside the paper's numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from lsvit import evaluators
from lsvit import order as order_lib
from lsvit import train_lib
from tools import machine, report


@dataclasses.dataclass(frozen=True)
class Preset:
  """One grid. ``config`` names a module of ``configs/``; ``overrides`` apply to every run
  (``--config.<key>=<value>``)."""
  config: str
  pretrain_epochs: int
  pretrain_lr: float
  epochs: int
  lr: float
  depth: int
  baseline_epochs: int = 0           # the sequential baselines' refinement; 0: ``epochs``
  seeds: int = 5                     # per variant (Table 1, Fig. 1b/c)
  merge_runs: int = 0                # layershuffle and baseline runs for merging; 0: depth
  keep: Sequence[int] = (3, 6, 9)    # reduced-depth refinements (Fig. 1b/c)
  keep_seeds: int = 5
  analysis_images: int = 1000        # Fig. 4 (an image may be drawn several times, new order)
  batch_size: int = 0                # refinements' batch; 0: the config's
  overrides: Sequence[str] = ()

  @property
  def merge_count(self) -> int:
    """Baseline and layershuffle runs: enough to merge all layers, and at least ``seeds``."""
    return max(self.merge_runs or self.depth, self.seeds)


# Recipes chosen by measurement: docs/recipes.md.
PRESETS: Dict[str, Preset] = {
    # 12 layers as ViT-B/16.
    # Baselines refine 1/5 as long as the others: the paper's ratio (CIFAR-100 20 vs 100
    # epochs; ImageNet 1 vs 20).
    "digits": Preset("digits", pretrain_epochs=30, pretrain_lr=1e-3, epochs=30, lr=2e-3,
                     depth=12, batch_size=32, baseline_epochs=6),
    # The whole pipeline in ~2 minutes, for tests and notebooks: 4 layers of width 32.
    "tiny": Preset("digits", pretrain_epochs=3, pretrain_lr=2e-3, epochs=1, lr=2e-3,
                   depth=4, seeds=2, keep=(2,), keep_seeds=1, analysis_images=200,
                   overrides=("model.width=32", "model.mlp_dim=64", "model.num_heads=2",
                              "eval_orders=2")),
}


def config_file(p: Preset) -> str:
  return importlib.import_module(f"configs.{p.config}").__file__


ARBITRARY_PASSES = 5  # passes over the validation split, a fresh random order per batch
PRUNE_DRAWS = 5       # random subsets of k layers per batch position
MERGES = 100          # merged models per setting


@dataclasses.dataclass
class Job:
  name: str
  args: List[str]
  cost: float          # relative compute: epochs x layers
  needs_pretrain: bool = True


def plan(p: Preset, out: str) -> List[Job]:
  """Every training run of the grid, pretraining first."""
  common = [f"--config.{o}" for o in p.overrides] + [f"--config.model.depth={p.depth}",
                                                     "--config.pretrain_epochs=0", "--config.progress=False"]
  pre = os.path.join(out, "pretrain")
  jobs = [Job("pretrain", common + ["--config.variant=baseline", "--config.init_from=",
                                    f"--config.num_epochs={p.pretrain_epochs}",
                                    f"--config.optimizer.lr={p.pretrain_lr}"],
              p.pretrain_epochs * p.depth, needs_pretrain=False)]
  refine = common + [f"--config.init_from={pre}", f"--config.optimizer.lr={p.lr}"]
  if p.batch_size:
    refine.append(f"--config.batch_size={p.batch_size}")
  for v in order_lib.VARIANTS:
    n = p.merge_count if v in ("baseline", "layershuffle") else p.seeds
    epochs = p.baseline_epochs or p.epochs if v == "baseline" else p.epochs
    for s in range(n):
      jobs.append(Job(f"{v}_seed{s}", refine + [f"--config.num_epochs={epochs}",
                                                f"--config.variant={v}", f"--config.seed={s}"],
                      epochs * p.depth))
  for k in p.keep:  # the paper does not say how long; as the LayerShuffle runs
    for s in range(p.keep_seeds):
      jobs.append(Job(f"baseline_keep{k}_seed{s}",
                      refine + [f"--config.num_epochs={p.epochs}", "--config.variant=baseline",
                                f"--config.keep_layers={k}", f"--config.seed={s}"], p.epochs * k))
  return jobs


def done(out: str, job: Job) -> bool:
  return os.path.exists(os.path.join(out, job.name, "summary.json"))


class Pool:
  """``workers`` training processes at a time, each pinned to its share of the cores."""

  def __init__(self, out: str, config: str, workers: int):
    cores = machine.usable_cores()
    self.workers = max(1, min(workers, len(cores)))
    per = len(cores) // self.workers
    self.slots = [cores[i * per:(i + 1) * per] for i in range(self.workers)]
    self.out, self.config = out, config
    self.running: Dict[int, tuple] = {}  # slot -> (job, Popen, log file, start)

  def start(self, slot: int, job: Job, all_cores: bool = False):
    cores = sum(self.slots, []) if all_cores else self.slots[slot]
    env = dict(os.environ)
    if len(cores) == 1:  # one thread per process; the pinning does the rest
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
    log = open(os.path.join(self.out, "logs", f"{job.name}.log"), "a")
    # The config imports its siblings (``from configs import default``).
    configs_parent = os.path.dirname(os.path.dirname(os.path.abspath(self.config)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [configs_parent, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "lsvit", "train", f"--config={self.config}",
           f"--workdir={os.path.join(self.out, job.name)}", *job.args]
    if shutil.which("taskset"):  # pin without a preexec_fn (fork hooks in a threaded JAX parent)
      cmd = ["taskset", "-c", ",".join(map(str, cores))] + cmd
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    self.running[slot] = (job, proc, log, time.time())

  def free_slot(self) -> Optional[int]:
    for s in range(self.workers):
      if s not in self.running:
        return s
    return None

  def poll(self):
    """Finished (job, returncode, seconds) since the last call."""
    finished = []
    for slot, (job, proc, log, t0) in list(self.running.items()):
      rc = proc.poll()
      if rc is not None:
        log.close()
        del self.running[slot]
        finished.append((job, rc, time.time() - t0))
    return finished

  def stop(self):
    for job, proc, log, _ in self.running.values():
      proc.terminate()
    for job, proc, log, _ in self.running.values():
      proc.wait()
      log.close()
    self.running.clear()


class RunFailed(RuntimeError):
  pass


def _tail(path: str, n: int = 15) -> str:
  try:
    with open(path) as f:
      return "".join(f.readlines()[-n:])
  except OSError:
    return ""


def train_all(jobs: List[Job], out: str, config: str, workers: int, progress: bool = True,
              log=print) -> Dict[str, float]:
  """Runs the jobs not yet done; returns seconds per job run now. Stops starting new jobs
  at the first failure and raises with its log's tail."""
  todo = [j for j in jobs if not done(out, j)]
  skipped = len(jobs) - len(todo)
  if skipped:
    log(f"{skipped} of {len(jobs)} runs already finished in {out}; skipping them")
  if not todo:
    return {}
  pool = Pool(out, config, workers)
  log(f"training {len(todo)} runs, {pool.workers} at a time (cores {pool.slots}); "
      f"logs in {out}/logs/")
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=sum(j.cost for j in todo), desc="grid", unit="layer-epoch", dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} layer-epochs [{elapsed}<{remaining}, {rate_fmt}]{postfix}")
  seconds: Dict[str, float] = {}
  failed = None
  pretrain = next((j for j in todo if not j.needs_pretrain), None)  # still to run, if at all
  queue = list(todo)
  try:
    while queue or pool.running:
      while queue and not failed and pool.free_slot() is not None:
        job = queue[0]
        if job.needs_pretrain and pretrain is not None and not done(out, pretrain):
          if pool.running:
            break  # the refinements wait for the pretrained model
          raise RunFailed("pretraining did not finish; see " + os.path.join(out, "logs", "pretrain.log"))
        job = queue.pop(0)  # the pretraining runs alone: give it every core
        pool.start(pool.free_slot(), job, all_cores=not job.needs_pretrain)
      if failed and not pool.running:
        break
      time.sleep(0.5)
      for job, rc, sec in pool.poll():
        seconds[job.name] = sec
        if rc != 0 or not done(out, job):
          failed = failed or (job, rc)
        if bar is not None:
          bar.update(job.cost)
          bar.set_postfix_str(f"{len(seconds)}/{len(todo)} runs, last {job.name} {sec:.0f}s")
  except KeyboardInterrupt:
    pool.stop()
    raise
  finally:
    if bar is not None:
      bar.close()
  if failed:
    job, rc = failed
    path = os.path.join(out, "logs", f"{job.name}.log")
    raise RunFailed(f"run {job.name} failed (exit {rc}); re-running the command resumes it. "
                    f"Last lines of {path}:\n{_tail(path)}")
  return seconds


# ----------------------------------------------------------------------------- evaluation

def evaluate_all(p: Preset, out: str, progress: bool = True, log=print) -> Dict[str, dict]:
  """The paper's evaluations, each into ``<out>/eval/<name>/`` (JSON, markdown, figures)."""
  merge_runs = p.merge_count
  seeds = range(p.seeds)
  w = lambda name: os.path.join(out, name)
  per_variant = [w(f"{v}_seed{s}") for v in order_lib.VARIANTS for s in seeds]
  keep = [w(f"baseline_keep{k}_seed{s}") for k in p.keep for s in range(p.keep_seeds)]
  merged = [w(f"layershuffle_seed{s}") for s in range(merge_runs)]
  steps = [
      ("table1", {"sequential": {}, "arbitrary": {"orders": ARBITRARY_PASSES}}, per_variant),
      ("pretrained", {"sequential": {}, "arbitrary": {"orders": ARBITRARY_PASSES}},
       [w("pretrain")]),
      ("prune", {"prune": {"ks": sorted(set(p.keep) | {p.depth}), "draws": PRUNE_DRAWS}},
       [w(f"{v}_seed{s}") for v in ("baseline", "layershuffle", "layerdrop") for s in seeds]
       + keep),
      ("merge_layershuffle", {"merge": {"merges": MERGES}}, merged),
      ("merge_baseline", {"merge": {"merges": MERGES}},
       [w(f"baseline_seed{s}") for s in range(merge_runs)]),
      ("ensemble_layershuffle", {"ensemble": {}}, merged),
      ("position", {"position": {"orders": ARBITRARY_PASSES}},
       [w(f"predict_seed{s}") for s in seeds]),
      # Fig. 4: the original (pretrained) model as the paper's baseline, and a LayerShuffle run.
      ("analysis", {"analysis": {"layer": 0, "images": p.analysis_images}},
       [w("pretrain"), w("layershuffle_seed0")]),
  ]
  results: Dict[str, dict] = {}
  for name, modes, workdirs in steps:
    log(f"== evaluating {name}: {', '.join(modes)} over {len(workdirs)} runs")
    results[name] = evaluators.run(workdirs, modes, os.path.join(out, "eval", name),
                                   progress=progress, log=lambda *a, **k: None)
  return results


def load_results(out: str):
  """The evaluation JSON and timing a previous invocation stored under ``out``."""
  ev = os.path.join(out, "eval")
  results: Dict[str, dict] = {}
  for name in sorted(os.listdir(ev)):
    for f in sorted(os.listdir(os.path.join(ev, name))):
      if f.endswith(".json"):
        with open(os.path.join(ev, name, f)) as fh:
          results.setdefault(name, {})[f[:-5]] = json.load(fh)
  with open(os.path.join(out, "timing.json")) as fh:
    return results, json.load(fh)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="digits", choices=sorted(PRESETS))
  ap.add_argument("--out", help="runs and evaluations (default: runs/reproduce_<preset>)")
  ap.add_argument("--results", help="the report to write (default: RESULTS.md for digits, "
                                    "<out>/RESULTS.md otherwise)")
  ap.add_argument("--workers", type=int, default=len(machine.usable_cores()),
                  help="training processes at once (default: one per core)")
  ap.add_argument("--dry_run", action="store_true", help="list the runs and exit")
  ap.add_argument("--report_only", action="store_true",
                  help="rewrite the report from the stored evaluation JSON (no training, no evaluation)")
  ap.add_argument("--no_progress", action="store_true")
  args = ap.parse_args(argv)
  p = PRESETS[args.preset]
  out = os.path.abspath(args.out or os.path.join("runs", f"reproduce_{args.preset}"))
  results_path = args.results or ("RESULTS.md" if args.preset == "digits"
                                  else os.path.join(out, "RESULTS.md"))
  jobs = plan(p, out)
  if args.dry_run:
    for j in jobs:
      print(f"{'done' if done(out, j) else 'todo'}  {j.name:28s} {' '.join(j.args)}")
    return 0
  cmd = ("python -m tools.reproduce --preset " + args.preset
         + (f" --out {args.out}" if args.out else ""))
  if args.report_only:
    try:
      results, timing = load_results(out)
    except FileNotFoundError as e:
      print(f"error: no stored evaluation ({e.filename}); run without --report_only first",
            file=sys.stderr)
      return 1
    print("wrote " + report.write(results, p, args.preset, out, results_path, cmd, timing))
    return 0
  os.makedirs(out, exist_ok=True)
  train_lib.quiet_logs()
  t0 = time.time()
  timing_path = os.path.join(out, "timing.json")
  timing = json.load(open(timing_path)) if os.path.exists(timing_path) else {"train_s": {}}
  try:
    timing["train_s"].update(train_all(jobs, out, config_file(p), args.workers,
                                       not args.no_progress))
  except RunFailed as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted; re-run the same command to resume", file=sys.stderr)
    return 130
  finally:
    with open(timing_path, "w") as f:
      json.dump(timing, f, indent=1)
  t1 = time.time()
  results = evaluate_all(p, out, not args.no_progress)
  timing["last_invocation"] = {"train_s": t1 - t0, "eval_s": time.time() - t1,
                               "workers": args.workers}
  with open(timing_path, "w") as f:
    json.dump(timing, f, indent=1)
  path = report.write(results, p, args.preset, out, results_path, cmd, timing)
  figures = os.path.join(os.path.dirname(path), report.figure_dir(args.preset))
  print(f"wrote {path} (figures in {figures})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
