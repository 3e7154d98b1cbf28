"""The shape of the code: the library imports no tool, no import cycles, one config truth."""
import ast
import importlib
import os
import subprocess
import sys

from tests.helpers import ROOT

LIB = os.path.join(ROOT, "lsvit")
TOOLS = ("bench", "tools", "configs", "tests", "train", "evaluate")


def imports(path):
  """Every module an import statement in ``path`` names, at any depth (functions too)."""
  names = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module in ("lsvit", "tools", "bench", "lsvit.swarm"):  # from lsvit import x:
        names |= {f"{node.module}.{a.name}" for a in node.names}  # module x, or x in lsvit
      else:
        names.add(node.module)
  return names


def library():
  """module name after 'lsvit.' -> path, subpackages too ('swarm' is lsvit/swarm/__init__.py)."""
  out = {}
  for dirpath, _, files in os.walk(LIB):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, LIB)[:-3].replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return dict(sorted(out.items()))


def test_the_library_imports_no_tool():
  for name, path in library().items():
    bad = sorted(m for m in imports(path)
                 if m.split(".")[0] in TOOLS + ("transformers", "timm"))
    assert not bad, f"{path} imports {bad}"


def test_importing_the_library_loads_no_torch():
  """torch is read only for PyTorch pickles (.bin/.pth) and bfloat16 safetensors, inside
  the function that reads them."""
  code = ("import sys\n" + "".join(f"import lsvit.{n}\n" for n in library()
                                    if not n.endswith("__main__"))
          + "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'bench', 'tools', 'configs', 'ray')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"


def first_party():
  """module name -> path, for the library and the tools beside it."""
  out = {f"lsvit.{n}": path for n, path in library().items()}
  for pkg in ("tools", "bench"):
    for f in os.listdir(os.path.join(ROOT, pkg)):
      if f.endswith(".py") and f != "__init__.py":
        out[f"{pkg}.{f[:-3]}"] = os.path.join(ROOT, pkg, f)
  return out


def test_no_import_cycles():
  modules = first_party()

  def targets(path):  # the module an import names: the longest first-party name it starts with
    hits = [[n for n in modules if m == n or m.startswith(n + ".")] for m in imports(path)]
    return {max(h, key=len) for h in hits if h}

  graph = {n: targets(p) - {n} for n, p in modules.items()}
  state = {}

  def visit(n, path):
    state[n] = "open"
    for m in sorted(graph[n]):
      assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [n, m])
      if m not in state:
        visit(m, path + [n])
    state[n] = "done"

  for n in sorted(graph):
    if n not in state:
      visit(n, [])


def test_no_line_over_100_columns_in_the_library():
  long = [f"{path}:{i}" for path in library().values()
          for i, line in enumerate(open(path), 1) if len(line.rstrip("\n")) > 100]
  assert not long, long


def test_every_config_overrides_default_and_adds_no_field():
  """One source of truth: configs/default.py declares every field; the others override."""
  sys.path.insert(0, ROOT)
  from configs import default
  from lsvit import train_lib

  def keys(d, prefix=""):
    out = set()
    for k, v in d.items():
      out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out

  base = keys(default.get_config().to_dict())
  for f in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if f.endswith(".py") and f not in ("__init__.py", "default.py"):
      c = importlib.import_module(f"configs.{f[:-3]}").get_config().to_dict()
      assert keys(c) == base, (f, sorted(keys(c) ^ base))
  assert {k for k in train_lib.ADDED_FIELDS} <= base


def test_a_run_saved_before_fields_were_added_still_resumes():
  """train_lib.ADDED_FIELDS: a saved config without a field later added to default.py matches
  a config holding the value that field's absence meant; any other value is still refused."""
  import pytest
  from lsvit import checkpoint, train_lib
  from tests.helpers import digits_config
  now = digits_config().to_dict()
  saved = {k: v for k, v in now.items()
           if k not in ("pretrain_epochs", "pretrain_lr", "refine_from_pretrain")}
  saved["model"] = {k: v for k, v in now["model"].items() if k != "name"}
  train_lib._check_resumable(saved, now, "wd")  # the digits config as saved before
  changed = dict(now, model=dict(now["model"], name="B/16"))
  with pytest.raises(checkpoint.CheckpointError, match="model.name: '' -> 'B/16'"):
    train_lib._check_resumable(saved, changed, "wd")
