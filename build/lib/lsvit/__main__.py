"""``python -m lsvit train|evaluate|convert ...``."""
from lsvit import cli

cli.main()
