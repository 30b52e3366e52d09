"""The `context-keras` command that `pip install` puts on the PATH: `context-keras PROGRAM [FLAGS...]` runs a program
exactly as `python -m context_keras.PROGRAM [FLAGS...]` does; `context-keras --help` lists the programs."""
import ast
import os
import runpy
import sys

# Every program of the package, in the order a user meets them.
PROGRAMS = ("train", "prepare", "export", "evaluate", "linear_eval", "detect", "ablation", "benchmark", "service")
HELP = ("-h", "--help", "-help", "help")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def summary(program):
  """The first line of a program's docstring, read from its source: importing all nine would take many seconds."""
  with open(os.path.join(_PACKAGE, f"{program}.py"), encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  first = doc.strip().splitlines()[0] if doc.strip() else ""
  return first.split(": python -m", 1)[0].rstrip(":")  # the command line it goes on to show is usage()'s


def usage():
  width = max(len(name) for name in PROGRAMS)
  lines = ["usage: context-keras PROGRAM [--flag=value ...]   (the same as python -m context_keras.PROGRAM ...)", "",
           "programs:"]
  lines += [f"  {name:<{width}}  {summary(name)}" for name in PROGRAMS]
  lines += ["", "context-keras PROGRAM --help lists the flags of PROGRAM."]
  return "\n".join(lines)


def main(argv=None):
  argv = sys.argv if argv is None else argv
  if len(argv) < 2 or argv[1] in HELP:
    print(usage())
    return 0 if len(argv) >= 2 else 2
  program = argv[1]
  if program not in PROGRAMS:
    sys.stderr.write(f"context-keras: no program {program!r}; the programs: {', '.join(PROGRAMS)}\n")
    return 2
  sys.argv = [f"context-keras {program}", *argv[2:]]
  runpy.run_module(f"context_keras.{program}", run_name="__main__", alter_sys=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
