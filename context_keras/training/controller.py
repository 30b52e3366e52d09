"""The controller every job that trains shares (train, linear_eval, detect): the run set-up as one context manager,
and one loop.

The shape is Orbit's (tensorflow/models, orbit/controller.py): the loop calls the trainer's compiled multi-step
function up to the next step at which some periodic action is due, then runs the actions (summaries, checkpoints,
exports, validation...), each a small object with an interval (actions.py). What a job adds is its trainer, its
input and its actions; what every job gets is here, once:

  job = controller.Job(KIND, options)         # SIGINT/SIGTERM are handled from here (control.Signals)
  folder = ... checks of the folder and flags ...
  with job.running(folder):                   # strategy, roles, lock, log file, determinism
    ... build the trainer under job.strategy.scope(), restore it from job.latest ...
    writer = job.summary_writer(...)          # TensorBoard (a no-op writer on workers other than the chief)
    checkpoints = job.checkpoints(checkpoint, trainer)
    control = job.control(trainer.request)    # quit and pause files, signals
    outcome = job.loop(trainer, iterator, actions, total_steps)
    if not outcome.finished:
      return outcome.exit_code
    ... the job's own ending (a final evaluation, its results) ...

A trainer offers current_step(), train_loop(iterator, num_steps) -> {"steps", "status", "request", ...} (a compiled
loop that stops early, on every worker at the same step, when a pause or quit is requested: control.votes) and
`request` (the tf.Variable that Control sets).
"""
import contextlib
import dataclasses
import json
import os
import time

from absl import logging
import tensorflow as tf

from context_keras import errors
from context_keras.storage import paths as paths_lib
from context_keras.storage import writes
from context_keras.training import actions as actions_lib
from context_keras.training import control as control_lib
from context_keras.training import distribute
from context_keras.training import run_dir


@dataclasses.dataclass(frozen=True)
class JobKind:
  """What a kind of job calls itself and the files it keeps in its folder."""
  holder: str          # in messages: "a training job holds --model_dir=..."
  folder_flag: str     # the flag that names the folder: model_dir, eval_dir
  log_file: str        # appended by every invocation
  quit_file: str       # FOLDER/<quit_file> speaks to this job alone; also the default of --quit_file (control.py)
  pause_file: str


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How a job runs: on which devices, and when it checkpoints, logs and looks at its control files (the run flags
  of cli/run.py)."""
  strategy: str = "auto"
  cpu_replicas: int = 1
  deterministic: bool = False
  quit_file: str = None            # None: the kind's quit_file, relative to the working directory
  pause_file: str = None
  steps_per_loop: int = 10
  log_every: int = 20
  checkpoint_every: int = 2000
  keep_checkpoints: int = 5


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How the loop ended: finished (the job's total steps reached) or stopped with the program's exit code."""
  finished: bool
  exit_code: int = 0


def keep_settings(kind, folder, name, recorded):
  """Refuses to resume a job in `folder` whose settings (FOLDER/name, recorded by an earlier run that left a
  checkpoint) differ from `recorded`; then records `recorded` there. For the jobs whose folder holds one job's
  configuration as JSON (linear_eval, detect; a training run's is run_dir's config.json). `kind`: the job's
  JobKind, whose folder flag the refusal names."""
  path = os.path.join(folder, name)
  if tf.train.latest_checkpoint(folder) and paths_lib.is_file(path):
    earlier = json.loads(paths_lib.read_text(path))
    different = [f"{key}: {earlier.get(key)} then, {value} now" for key, value in recorded.items()
                 if json.loads(json.dumps(value)) != earlier.get(key)]
    if different:
      flag = f"--{kind.folder_flag}"
      raise errors.UsageError(f"{flag}={folder} holds a job with other settings ({'; '.join(different[:4])}): "
                              f"use another {flag}, or delete it to start over")
  writes.atomic_write_json(path, recorded)


class Job:
  """The run set-up of one job: strategy, chief and worker roles, the folder's lock and log file, checkpoints,
  TensorBoard writer, control files and signals, all released when `running` ends (whatever ends it)."""

  def __init__(self, kind, options):
    # From here on SIGINT and SIGTERM end the process at once (exit 128 + the signal), until the loop can stop
    # gracefully: a Python KeyboardInterrupt could surface anywhere, mid-write.
    self.signals = control_lib.Signals()
    self.kind, self.options = kind, options
    self.strategy = self.folder = self.write_dir = None
    self.is_chief, self.task = True, "chief"
    self._stack = None

  @contextlib.contextmanager
  def running(self, folder):
    """Sets up the job in `folder` (checked by the program): the strategy first, since MultiWorkerMirroredStrategy
    must exist before other TensorFlow work."""
    self.folder = folder
    self.strategy = distribute.make_strategy(self.options.strategy, self.options.cpu_replicas)
    self.signals.install()
    self.is_chief, self.task = distribute.worker_role(self.strategy)
    # The chief writes the job's folder; another worker writes its checkpoints and exports to a scratch folder (all
    # workers must save, since saving distributed variables can involve every worker) that it removes at the end.
    self.write_dir = folder if self.is_chief else run_dir.worker_scratch(folder, self.task)
    with contextlib.ExitStack() as stack:
      self._stack = stack
      if self.is_chief:
        stack.enter_context(run_dir.lock(folder, self.kind.folder_flag, self.kind.holder))
        stack.enter_context(run_dir.LogFile(folder, self.kind.log_file))
      else:
        stack.callback(writes.remove_tree, self.write_dir)
      name = ("MultiWorkerMirroredStrategy" if distribute.is_multi_worker(self.strategy)
              else type(self.strategy).__name__)
      logging.info("Strategy: %s with %d replica(s)%s.", name, self.strategy.num_replicas_in_sync,
                   "" if self.task == "chief" else f"; this is {self.task}{' (chief)' if self.is_chief else ''}")
      if self.options.deterministic:
        tf.config.experimental.enable_op_determinism()
      try:
        yield self
      finally:
        self._stack = None

  @property
  def latest(self):
    """The folder's latest checkpoint (every worker restores the chief's), or None."""
    return tf.train.latest_checkpoint(self.folder)

  def summary_writer(self, previous_checkpoint=None):
    """The TensorBoard writer of FOLDER/train (a no-op writer on other workers), closed when the job ends; wrapped so
    that a failed write stops the job with a WriteError naming the step and the checkpoint that is intact."""
    where = run_dir.train_dir(self.write_dir)
    if self.is_chief:
      try:
        writer = tf.summary.create_file_writer(run_dir.train_dir(self.folder))
      except (OSError, tf.errors.OpError) as e:
        raise run_dir.write_failure("the TensorBoard log", self.folder, e, previous_checkpoint) from e
    else:
      writer = tf.summary.create_noop_writer()
    self._stack.callback(actions_lib.close_writer, writer)
    return actions_lib.SummaryWriter(writer, where, lambda: tf.train.latest_checkpoint(self.write_dir))

  def checkpoints(self, checkpoint, trainer):
    """The Checkpoints action: `checkpoint` (a tf.train.Checkpoint) every --checkpoint_every steps, on a stop and at
    the end, into the write folder, keeping --keep_checkpoints."""
    manager = tf.train.CheckpointManager(checkpoint, self.write_dir, max_to_keep=self.options.keep_checkpoints,
                                         checkpoint_name=run_dir.CHECKPOINT_PREFIX)
    return actions_lib.Checkpoints(manager, self.options.checkpoint_every, trainer)

  def control(self, request):
    """Quit and pause requests (FOLDER's own control files, --quit_file and --pause_file, SIGINT and SIGTERM) as
    the value of `request`, watched until the job ends."""
    files = [control_lib.run_files(self.folder, name, flag or name, self.is_chief) for name, flag in (
        (self.kind.quit_file, self.options.quit_file), (self.kind.pause_file, self.options.pause_file))]
    return self._stack.enter_context(control_lib.Control(*files, request, self.signals))

  def loop(self, trainer, iterator, actions, total_steps, control, checkpoints, guard=None):
    """Trains to `total_steps` (0: until stopped): compiled calls of up to --steps_per_loop steps, each ending where
    an action is due; after each, the actions run, then a quit or pause request is honoured (checkpoint, then exit
    or wait). `guard(output)` may end the job first with an exit code (training's divergence check). When the
    total is reached, every action's `end` runs (the final checkpoint, export...) and the outcome is `finished`."""
    try:
      return self._loop(trainer, iterator, actions, total_steps, control, checkpoints, guard)
    except distribute.LOST_WORKER_ERRORS as e:
      if not distribute.is_multi_worker(self.strategy):
        raise
      return Outcome(False, self._worker_lost(e, trainer, checkpoints))

  def _loop(self, trainer, iterator, actions, total_steps, control, checkpoints, guard):
    step = trainer.current_step()
    if total_steps and step >= total_steps:
      logging.info("Step %d already reaches the job's %d steps: nothing to train.", step, total_steps)
      return Outcome(True)
    while not total_steps or step < total_steps:
      for action in actions:
        action.before(step)
      num_steps = actions_lib.steps_to_next(step, total_steps, actions, self.options.steps_per_loop)
      start = time.perf_counter()
      values = trainer.train_loop(iterator, tf.constant(num_steps))
      before, step = step, trainer.current_step()
      output = actions_lib.LoopOutput(step=step, steps=int(values["steps"]), status=int(values["status"]),
                                      values=values, seconds=time.perf_counter() - start)
      code = guard(output) if guard else None
      if code is not None:
        return Outcome(False, code)
      # A call whose every update was skipped (float16 overflows) left the step where it was: nothing new is due.
      for action in actions:
        if step > before or output.status != control_lib.STATUS_OK or action.every_call:
          action(output)
      stopping = output.status == control_lib.STATUS_STOP_REQUESTED
      if stopping and control.honour(int(values["request"]), step, checkpoints.save):
        for action in actions:
          action.end(step, finished=False)
        return Outcome(False, 0)
    for action in actions:
      action.end(step, finished=True)
    return Outcome(True)

  def _worker_lost(self, error, trainer, checkpoints):
    """What a worker says when another one of a multi-worker job dies or stops answering (TensorFlow's coordination
    service notices within seconds and aborts the collective ops of all): which, when, and where the job resumes."""
    lost = distribute.lost_tasks(error, self.task)
    try:
      when = f"at step {trainer.current_step() + 1}"
    except (tf.errors.OpError, RuntimeError):
      when = f"after step {checkpoints.last_step}"
    logging.error("Lost %s %s (%s). Restart the whole job, every worker with the same command and TF_CONFIG: all "
                  "resume from %s. Exit code %d means: restart the job.",
                  " and ".join(lost) if lost else "another worker", when, errors.tf_error_message(error, 200),
                  self.latest or "scratch (no checkpoint yet)", errors.EXIT_WORKER_LOST)
    return errors.EXIT_WORKER_LOST
