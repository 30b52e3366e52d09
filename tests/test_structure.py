"""The package's rooms and the direction of its imports: programs on top, then the flag groups, then the library;
no cycles; flags defined only by programs and flag groups; no Python callbacks in the input pipeline's graph."""
import ast
import glob
import os
import subprocess
import sys

import pytest

from helpers import REPO

PACKAGE = os.path.join(REPO, "context_keras")
PROGRAMS = {"train", "prepare", "export", "evaluate", "benchmark", "service", "linear_eval", "ablation"}


def module_name(path):
  relative = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return relative[:-len(".__init__")] if relative.endswith(".__init__") else relative


def import_graph():
  """{module: set of context_keras modules it imports}, from the source (nothing is imported)."""
  graph = {}
  for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
    name = module_name(path)
    imported = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("context_keras"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          imported.add(full if os.path.exists(os.path.join(REPO, *full.split(".")) + ".py") else node.module)
      elif isinstance(node, ast.Import):
        imported.update(a.name for a in node.names if a.name.startswith("context_keras"))
    graph[name] = imported - {name}
  return graph


def short(name):
  return name.split(".", 1)[1] if "." in name else name


def test_imports_point_one_way_without_cycles():
  graph = import_graph()
  state = {}

  def visit(node, path):
    state[node] = "active"
    for child in graph.get(node, ()):
      assert state.get(child) != "active", f"import cycle: {' -> '.join(path + [child])}"
      if child not in state:
        visit(child, path + [child])
    state[node] = "done"

  for node in graph:
    if node not in state:
      visit(node, [node])


def test_library_modules_import_no_program_and_no_flag_group():
  for name, imported in import_graph().items():
    if short(name) in PROGRAMS or short(name).startswith("flagsets"):
      continue
    offending = {short(m) for m in imported if short(m) in PROGRAMS or short(m).startswith("flagsets")}
    assert not offending, f"{name} imports {offending}: library modules take configs, programs own the flags"


def test_flags_are_defined_only_by_programs_flag_groups_and_the_scaffold():
  for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
    name = short(module_name(path))
    if name in PROGRAMS or name.startswith("flagsets") or name == "program":
      continue
    source = open(path, encoding="utf-8").read()
    assert "DEFINE_" not in source and "define_integer(" not in source, f"{name} defines flags"


def test_no_python_callbacks_in_the_graph_code():
  for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
    source = open(path, encoding="utf-8").read()
    assert "py_function" not in source and "numpy_function" not in source, path


def test_every_numeric_flag_is_defined_with_bounds_in_the_scaffold():
  """Numeric flags are defined only through program.define_integer/define_float, so that check_bounds sees them
  all (the scaffold adds finiteness and the int32 limit to every one); every integer flag has a lower bound."""
  for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
    if short(module_name(path)) == "program":
      continue
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
      if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        continue
      name = node.func.attr
      assert name not in ("DEFINE_integer", "DEFINE_float"), f"{path}:{node.lineno} defines a numeric flag unchecked"
      if name == "define_integer":
        assert "lower" in {k.arg for k in node.keywords}, f"{path}:{node.lineno}: integer flag without a lower bound"


@pytest.mark.slow  # a fresh interpreter importing every module: 6-8 s
def test_importing_the_package_leaves_tensorflow_unstarted():
  """No module makes a tensor when it is imported: that would start TensorFlow's runtime before the programs set
  up their devices (two logical CPUs, collective ops for several workers), which then fail or see one device."""
  modules = sorted(module_name(p) for p in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True))
  code = ("import importlib, sys\n"
          f"for name in {modules!r}: importlib.import_module(name)\n"
          "from tensorflow.python.eager import context\n"
          "print('started' if context.context()._initialized else 'not started')\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split()[-2:] == ["not", "started"], result.stdout
