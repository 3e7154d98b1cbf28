"""Evaluate trained runs: ``python evaluate.py --mode merge --workdir 'runs/*_seed*'``.

The same command as ``lsvit-evaluate`` / ``python -m lsvit evaluate`` (see ``lsvit/cli.py``).
"""
from lsvit import cli

if __name__ == "__main__":
  cli.evaluate_main()
