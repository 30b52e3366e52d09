"""Every program's flags, defined in-process: their defaults are their config fields' (a flag left out and a config
built without it agree), their help is at most two lines of --help and points to docs/flags.md for the rest, every
choice of an enum flag is said, and docs/flags.md gives every default as the program has it. Also the flag rules of
the geometry (docs/flags.md#geometry): the smallest input side, the settings a geometry does not use, and the flags
that --init_from names when a source does not fit."""
import contextlib
import dataclasses
import importlib
import inspect
import os
import re

from absl import flags
import pytest
import tensorflow as tf

from context_keras import errors
from context_keras.cli import data as data_flags
from context_keras.cli import model as model_flags
from context_keras.cli import optimisation as optimisation_flags
from context_keras.cli import program
from context_keras.deploy import rescale as rescale_lib
from context_keras.deploy import serving
from context_keras.evaluation import PROTOCOLS
from context_keras.evaluation import detector as detector_lib
from context_keras.evaluation import linear
from context_keras.evaluation import linear_job
from context_keras.evaluation import pretext
from context_keras.evaluation import subject as subject_lib
from context_keras.input import geometry as geometry_lib
from context_keras.input import pipeline as data_lib
from context_keras.model import networks as model_lib
from context_keras.training import restore
from context_keras.training import run_dir
from context_keras.training import trainer as trainer_lib
from context_keras.training import warm_start
from helpers import REPO

FLAGS = flags.FLAGS
PROGRAMS = ("train", "evaluate", "linear_eval", "ablation", "prepare", "export", "benchmark", "service", "detect")
FLAGS_DOC = os.path.join(REPO, "docs", "flags.md")


@contextlib.contextmanager
def program_flags(name, *argv):
  """The module of program `name` with its flags defined in this process and parsed from `argv`; afterwards the
  flags are removed again, so that the next program can define its own."""
  saved = {"_GROUPS": dict(program._GROUPS), "_BOUNDS": dict(program._BOUNDS), "_CHECKS": list(program._CHECKS)}
  program._GROUPS.clear(), program._BOUNDS.clear(), program._CHECKS.clear()
  before = set(FLAGS)
  module = importlib.import_module(f"context_keras.{name}")
  try:
    module.define_flags()
    FLAGS.unparse_flags()
    FLAGS([name, *argv])
    yield module
  finally:
    for flag_name in set(FLAGS) - before:
      delattr(FLAGS, flag_name)
    FLAGS.unparse_flags()
    for attribute, value in saved.items():
      getattr(program, attribute).clear()
      getattr(program, attribute).update(value) if isinstance(value, dict) else getattr(program, attribute).extend(
          value)


def every_program():
  for name in PROGRAMS:
    with program_flags(name) as module:
      yield name, module, program.defined_flags()


def training_configs():
  """(built, default) of the training flags' configs; the flag --augment_on=auto is resolved for the hardware (the
  config records what ran)."""
  return [(data_flags.input_config(FLAGS.seed),
           dataclasses.replace(data_lib.InputConfig(data=None), augment_on=data_lib.resolve_augment_on("auto"))),
          (model_flags.model_config(), model_lib.ModelConfig()),
          (optimisation_flags.optim_config(FLAGS.train_steps), trainer_lib.OptimConfig())]


def built_and_default(name, module):
  """(config built from the program's default flags, the config's own default) of every config it builds."""
  if name == "train":
    return training_configs()
  if name == "ablation":
    return training_configs() + [(module.pretext_config(), pretext.Config(data=None)),
                                 (module.probe_config(linear.Config.seed), linear.Config())]
  if name == "evaluate":
    required = {"pretext": {"data": None}, "neighbors": {"data": None}}
    return [(module.protocol_config(mode), protocol.Config(**required.get(mode, {})))
            for mode, protocol in PROTOCOLS.items()]
  if name == "linear_eval":
    return [(module.job_config(), linear_job.JobConfig())]
  if name == "prepare":
    return [(module.config_from_flags(), module.PrepareConfig(data=None, output=None, num_shards=None))]
  if name == "export":  # the rescaling's settings are rescale.rescale's keyword defaults
    signature = {k: p.default for k, p in inspect.signature(rescale_lib.rescale).parameters.items()
                 if p.default is not inspect.Parameter.empty}
    return [(module.rescale_options(), dict(signature, num_patches=rescale_lib.NUM_PATCHES))]
  if name == "benchmark":
    return [(model_flags.model_config(), model_lib.ModelConfig())]
  if name == "detect":
    return [(module.detector_config(), detector_lib.DetectorConfig())]
  return []  # service: no config


def test_every_flag_default_is_its_config_fields_default():
  """A program's configs built from its flags left at their defaults are the configs' defaults (evaluate's
  --batch_size is every protocol's, finetune's included)."""
  checked = set()
  for name, module, _ in every_program():
    for built, default in built_and_default(name, module):
      assert built == default, (name, built, default)
      checked.add(name)
  assert checked == set(PROGRAMS) - {"service"}


def slug(heading):
  """A Markdown heading's anchor, as GitHub makes it."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def doc_sections():
  """{anchor: the text of its section, up to the next heading} of docs/flags.md."""
  sections, anchor = {}, None
  for line in open(FLAGS_DOC, encoding="utf-8"):
    heading = re.match(r"#+ (.*)", line)
    if heading:
      anchor = slug(heading.group(1))
      sections[anchor] = ""
    elif anchor:
      sections[anchor] += line
  return sections


def own_help(flag):
  """A flag's help without absl's list of an enum's choices ("<a|b>: ")."""
  return re.sub(r"^<[^>]*>: ", "", flag.help)


def test_help_is_at_most_two_lines_and_its_links_resolve():
  """A help is at most program.MAX_HELP_LINES lines as --help prints it (program.help_lines: whitespace collapsed,
  lines of program.HELP_WIDTH characters, the default not counted); a 'docs/flags.md#anchor' it names is a section
  of docs/flags.md."""
  sections = doc_sections()
  for name, _, defined in every_program():
    for flag_name, flag in defined.items():
      lines = program.help_lines(flag.help)
      assert len(lines) <= program.MAX_HELP_LINES, (name, flag_name, lines)
      for anchor in re.findall(r"docs/flags\.md#([\w-]+)", flag.help):
        assert anchor in sections, (name, flag_name, anchor)


def test_every_choice_of_an_enum_flag_is_said():
  """Each value an enum flag accepts is named in its help (besides absl's list of them) or in the docs/flags.md
  section the help points to."""
  sections = doc_sections()
  for name, _, defined in every_program():
    for flag_name, flag in defined.items():
      choices = getattr(flag.parser, "enum_values", None)
      if not choices:
        continue
      text = own_help(flag) + "".join(sections[a] for a in re.findall(r"docs/flags\.md#([\w-]+)", flag.help))
      for choice in choices:
        assert re.search(rf"(?<![\w-]){re.escape(choice)}(?![\w-])", text), (name, flag_name, choice)


def doc_defaults():
  """{anchor: {flag: default as docs/flags.md's tables give it}}."""
  found = {}
  for anchor, text in doc_sections().items():
    for flag_name, cell in re.findall(r"^\| `--(\w+)` \|([^|]*)\|", text, re.M):
      found.setdefault(anchor, {})[flag_name] = cell.strip()
  return found


def same_default(cell, flag):
  value = flag.default
  if cell.startswith("("):  # depends on the machine
    return True
  if value is None or value == [] or value == "":
    return cell == ""
  if isinstance(value, bool):
    return cell == str(value).lower()
  if isinstance(value, (int, float)):
    return float(cell) == float(value)
  if isinstance(value, list):
    return cell == ",".join(value)
  return cell == value


# Which program's flags each section of docs/flags.md tabulates.
DOC_PROGRAMS = {"images": "train", "geometry": "train", "augmentation": "train", "shortcut-fixes": "train",
                "batching": "train", "model": "train", "optimisation": "train", "run": "train",
                "labelled-data": "linear_eval", "evaluate": "evaluate", "linear_eval": "linear_eval",
                "detect": "detect", "prepare": "prepare", "export": "export", "rescaling": "export",
                "ablation": "ablation", "benchmark": "benchmark", "service": "service"}


def test_docs_give_every_flag_with_its_default():
  """Every flag of every program has a row in docs/flags.md, and each row's default is the flag's in the program
  whose section it is in."""
  tables = doc_defaults()
  assert set(tables) == set(DOC_PROGRAMS)
  documented = set().union(*tables.values())
  for name, _, defined in every_program():
    assert set(defined) <= documented, (name, set(defined) - documented)
    for anchor, rows in tables.items():
      if DOC_PROGRAMS[anchor] == name:
        for flag_name, cell in rows.items():
          assert flag_name in defined, (anchor, flag_name)
          assert same_default(cell, defined[flag_name]), (anchor, flag_name, cell, defined[flag_name].default)


# --------------------------------------------------------------------------------------------------------------
# The geometry's rules (issue 23, items 18, 20 and 16)

def test_the_smallest_input_side_is_one_patch_of_the_geometry():
  """evaluate, linear_eval and ablation take any side down to the patch size of the run's geometry, and refuse a
  smaller one with the same message."""
  for name, argv in (("evaluate", ["--image_size=64"]), ("linear_eval", ["--crop_size=64"]),
                     ("ablation", ["--probe_image_size=64"])):
    with program_flags(name, *argv):
      assert not program.bound_problems(), name
  geometry_lib.REVISITING.check_input_side("--image_size", 64)
  for geometry, flag, value, side in ((geometry_lib.REVISITING, "--image_size", 63, None),
                                      (geometry_lib.DOERSCH, "--image_size", 95, None),
                                      (geometry_lib.REVISITING, "--crop_size", 189, 63)):
    with pytest.raises(errors.UsageError, match=rf"^Invalid flags: {flag}={value} gives .* a backbone of "
                       rf"--geometry={geometry.name} needs at least one patch, {geometry.patch_size} px"):
      geometry.check_input_side(flag, value, side)
  with program_flags("linear_eval", "--protocol=patches", "--crop_size=192") as linear_eval:
    linear_eval.check_side(linear_eval.job_config(), geometry_lib.REVISITING)
    with pytest.raises(errors.UsageError, match="--crop_size=192 gives patches of 64 px"):
      linear_eval.check_side(linear_eval.job_config(), geometry_lib.DOERSCH)


REVISITING_MODEL = model_lib.ModelConfig(backbone="resnet18", width_multiplier=0.0625, head="revisiting",
                                         patch_size=geometry_lib.REVISITING.patch_size)


def test_a_revisiting_run_reports_its_colour_handling_and_refuses_colour_flags(tmp_path):
  """A revisiting run grays and standardises its patches: that is what its reports and exports call its colour mode,
  and a --color_mode or --pixelation given to it (training, or a pretext evaluation) is refused, naming the flag."""
  config = run_dir.RunConfig(model=REVISITING_MODEL, input=data_lib.InputConfig(data="x", geometry="revisiting"),
                             optimisation=trainer_lib.OptimConfig())
  run = restore.Run(model_dir="RUN", checkpoint="RUN/ckpt-1", step=1, config=config, networks=None)
  assert run.describe()["color_mode"] == "standardization" == run.preprocessing
  assert serving.metadata(REVISITING_MODEL, "drop", geometry="revisiting")["color_mode"] == "standardization"
  assert serving.metadata(model_lib.ModelConfig(), "project")["color_mode"] == "project"

  subject = subject_lib.Subject(about={}, step=1, model_config=REVISITING_MODEL, color_mode="drop", pixelation=True,
                                features=None, pair_logits=lambda *pair: None, geometry="revisiting")
  for given, flag in ((dict(color_mode="project"), "--color_mode=project"), (dict(pixelation=False),
                                                                            "--nopixelation")):
    with pytest.raises(errors.UsageError, match=f"^Invalid flags: {flag} does nothing with --geometry=revisiting"):
      pretext.evaluate(subject, pretext.Config(data=str(tmp_path), **given))

  with program_flags("train", "--geometry=revisiting", "--color_mode=none"):
    with pytest.raises(errors.UsageError, match="^Invalid flags: --color_mode=none does nothing with --geometry="):
      data_flags.input_config(0)
  with program_flags("train", "--geometry=revisiting", "--head=revisiting"):
    assert data_flags.input_config(0).geometry == "revisiting"  # left out, the colour flags do not matter
  with program_flags("evaluate", "--mode=linear", "--model_dir=RUN", "--pixelation") as evaluate:
    with pytest.raises(errors.UsageError, match="^Invalid flags: --pixelation choose how --mode=pretext"):
      evaluate.main()


def saved_run(folder, model_config, geometry):
  """A run directory holding model_config's networks (random weights) in checkpoint ckpt-1."""
  folder.mkdir()
  run_dir.write_config(str(folder), run_dir.RunConfig(model=model_config, input=data_lib.InputConfig(
      data="x", geometry=geometry), optimisation=trainer_lib.OptimConfig()))
  networks = restore.build_networks(model_config)
  tf.train.Checkpoint(tower=networks.tower, head=networks.head).save(os.path.join(folder, run_dir.CHECKPOINT_PREFIX))
  return str(folder)


@pytest.mark.parametrize("source, target, named", [
    # Another ResNet version: other layers (its pre-activation batch norms), the same --backbone.
    pytest.param(dict(backbone="resnet18", resnet_version=1), dict(backbone="resnet18", resnet_version=2),
                 "--resnet_version=1 there, 2 here", marks=pytest.mark.slow),  # 7 s: two ResNets built
    # Another geometry: AlexNet's fc6 sees a 96-px patch's map there, a 64-px one's here, at the same width.
    (dict(), dict(patch_size=geometry_lib.REVISITING.patch_size), "--geometry=doersch there, revisiting here")])
def test_init_from_names_the_flag_that_differs(tmp_path, source, target, named):
  source, target = (model_lib.ModelConfig(width_multiplier=0.0625, **kwargs) for kwargs in (source, target))
  path = saved_run(tmp_path / "source", source, geometry_lib.with_patch_size(source.patch_size).name)
  with pytest.raises(errors.UsageError) as raised:
    warm_start.initialise(restore.build_networks(target), target, path)
  message = str(raised.value)
  assert named in message and "check --" not in message, message
