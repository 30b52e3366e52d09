"""The package's rooms and the direction of its imports: programs on top, then the command-line scaffold and flag
groups (cli/), then the library's rooms from evaluation/ down to storage/; no cycles; flags defined only by programs
and flag groups; no Python callbacks in the input pipeline's graph; one version, which setup.py and CITATION.cff
repeat; conftest's longest tests are tests that exist."""
import ast
import glob
import os
import re
import runpy
import subprocess
import sys

import pytest
import setuptools

import context_keras
from helpers import REPO

PACKAGE = os.path.join(REPO, "context_keras")
PROGRAMS = {"train", "prepare", "export", "evaluate", "benchmark", "service", "linear_eval", "ablation", "detect"}
# The rooms, lowest first: a module imports only from its own room and the rooms below it. The package itself (its
# __init__: TensorFlow imported quietly, the version) is below them all.
ROOMS = ["package", "errors", "storage", "input", "model", "deploy", "training", "evaluation", "cli", "programs"]


def room(name):
  """The room of a module given by its name within the package (`input.patches`, `train`, `errors`)."""
  top = name.split(".", 1)[0]
  if name == "context_keras":
    return "package"
  return "programs" if top in PROGRAMS else top


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


def test_every_module_lives_in_a_room():
  for name in import_graph():
    assert room(short(name)) in ROOMS, f"{name} is in no room of {ROOMS}"


def test_imports_point_down_the_rooms():
  """Library rooms take configs, never flags; programs own the flags (cli/ turns them into configs)."""
  for name, imported in import_graph().items():
    level = ROOMS.index(room(short(name)))
    offending = {short(m) for m in imported if ROOMS.index(room(short(m))) > level}
    assert not offending, f"{name} ({room(short(name))}/) imports {offending} from rooms above it"


def test_flags_are_defined_only_by_programs_flag_groups_and_the_scaffold():
  for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
    name = short(module_name(path))
    if room(name) in ("programs", "cli"):
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
    if short(module_name(path)) == "cli.program":
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
def test_importing_the_package_starts_no_tensorflow_and_needs_no_optional_extra():
  """No module makes a tensor when it is imported: that would start TensorFlow's runtime before the programs set
  up their devices (two logical CPUs, collective ops for several workers), which then fail or see one device. And
  every module imports where matplotlib (the optional `plot` extra) is not installed: it is imported to draw; nor
  does any import TensorFlow Datasets (the optional `tfds` extra): only a tfds: source does."""
  modules = sorted(module_name(p) for p in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True))
  code = ("import importlib, sys\n"
          "sys.modules['matplotlib'] = None  # `import matplotlib` fails, as where it is not installed\n"
          f"for name in {modules!r}: importlib.import_module(name)\n"
          "from tensorflow.python.eager import context\n"
          "print('tfds imported' if 'tensorflow_datasets' in sys.modules else 'tfds not imported')\n"
          "print('started' if context.context()._initialized else 'not started')\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split()[-2:] == ["not", "started"], result.stdout
  assert "tfds not imported" in result.stdout, result.stdout


def test_one_version_that_setup_py_and_citation_cff_repeat(monkeypatch, tmp_path):
  """setup.py builds context_keras.__version__, read from the package's source without importing it (TensorFlow),
  from any working directory (README.md found beside setup.py); CITATION.cff cites the same version; the test extra
  installs every optional feature's extra."""
  built = {}
  monkeypatch.setattr(setuptools, "setup", lambda **kwargs: built.update(kwargs))
  monkeypatch.chdir(tmp_path)
  runpy.run_path(os.path.join(REPO, "setup.py"))
  assert re.fullmatch(r"\d+\.\d+\.\d+", context_keras.__version__)
  assert built["version"] == context_keras.__version__
  assert built["long_description"] == open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
  imported = {(node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
              for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
  assert not imported & {"context_keras", "tensorflow", "keras"}, imported
  extras = built["extras_require"]
  for extra in ("plot", "tfds", "detection", "onnx", "litert"):
    assert set(extras[extra]) <= set(extras["test"]), extra
  citation = open(os.path.join(REPO, "CITATION.cff"), encoding="utf-8").read()
  assert re.search(r"^cff-version: 1\.2\.0$", citation, re.MULTILINE)
  assert re.search(r"^version: (\S+)$", citation, re.MULTILINE).group(1) == context_keras.__version__
  assert built["license"] == "Apache-2.0" and "Apache License" in open(os.path.join(REPO, "LICENSE")).read()


def test_the_longest_tests_scheduled_first_exist():
  """conftest.LONGEST names test functions of this suite: a renamed one would silently lose its early start."""
  import conftest  # pylint: disable=import-outside-toplevel
  defined = set()
  for path in glob.glob(os.path.join(os.path.dirname(__file__), "test_*.py")):
    defined |= set(re.findall(r"^def (test_\w+)\(", open(path, encoding="utf-8").read(), re.M))
  assert conftest.LONGEST <= defined, sorted(conftest.LONGEST - defined)
