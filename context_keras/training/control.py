"""Quit and pause requests, from control files and signals, for a training process.

The original polled `<script>_quit` and `<script>_pause` files in the working directory (method.md §4.4); we do
the same, and also poll RUN/train_quit and RUN/train_pause, which speak to one run alone, and treat SIGINT and
SIGTERM as a quit. A request becomes the value of a tf.Variable that every compiled step reads (trainer.py), so it
takes effect after the step in flight, at the same step on every worker.
"""
import os
import signal
import socket
import threading
import time

from absl import logging
import tensorflow as tf

from context_keras.storage import paths as paths_lib

# What a worker asks of all; every step sums the requests of all replicas.
REQUEST_NONE, REQUEST_PAUSE, REQUEST_QUIT = 0, 1, 2
# What a compiled training loop reports: its steps ran, or it stopped early for a request (a trainer may add more:
# trainer.py's divergence statuses).
STATUS_OK, STATUS_STOP_REQUESTED = 0, 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def votes(request):
  """A replica's vote (in a compiled step): the request variable as the two counts that the step sums over every
  replica and worker, so that one worker's request stops all of them after the same step."""
  return {"pause_votes": tf.cast(tf.equal(request, REQUEST_PAUSE), tf.int32),
          "quit_votes": tf.cast(tf.equal(request, REQUEST_QUIT), tf.int32)}


@tf.autograph.experimental.do_not_convert  # graph code, called in the compiled loop
def agreed_request(summed):
  """The request that the votes summed over all replicas make: quit before pause, else none."""
  return tf.where(summed["quit_votes"] > 0, REQUEST_QUIT,
                  tf.where(summed["pause_votes"] > 0, REQUEST_PAUSE, REQUEST_NONE))


class Signals:
  """SIGINT and SIGTERM for the whole life of a training process.

  Python runs a signal handler only between two bytecodes of the main thread, which can sit for minutes inside one
  TensorFlow call (a compiled loop, a start-up that waits for an unreachable tf.data service), so a handler would
  run late or never. Here the interpreter's own C-level handler writes each signal's number to a socket
  (signal.set_wakeup_fd) that a thread reads, and the thread acts at once: the first signal asks for a graceful
  stop through `graceful(name)` when one is set (training: finish the step, checkpoint, exit 0); a second signal,
  or a first one while no graceful stop is possible (start-up, the final checkpoint and export), ends the process
  at once with exit code 128 + the signal's number. The latest checkpoint is then whole, as after a kill -9.
  """

  def __init__(self):
    self.graceful = None
    self.stopping = None
    self._reader, self._writer = socket.socketpair()
    self._writer.setblocking(False)
    self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
    self._previous = {s: signal.signal(s, _ignore) for s in STOP_SIGNALS}
    self._thread = threading.Thread(target=self._watch, daemon=True, name="signals")
    self._thread.start()

  def install(self):
    """Takes SIGINT and SIGTERM back: TensorFlow installs its own SIGTERM handler with MultiWorkerMirroredStrategy
    (for its preemption support), which would swallow them."""
    signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
    for s in STOP_SIGNALS:
      signal.signal(s, _ignore)

  def _watch(self):
    while True:
      try:
        data = self._reader.recv(64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum in STOP_SIGNALS:
          self._handle(signum)

  def _handle(self, signum):
    name = signal.Signals(signum).name
    if self.graceful is not None and not self.stopping:
      self.stopping = name
      self.graceful(name)
      return
    why = f"again while stopping ({self.stopping})" if self.stopping else "while no checkpoint can be written"
    logging.error("%s %s: exiting now; the latest complete checkpoint is kept, and a re-run resumes from it.", name,
                  why)
    logging.flush()
    os._exit(128 + signum)  # pylint: disable=protected-access  # the main thread may never return to Python

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    signal.set_wakeup_fd(self._previous_fd)
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._writer.close()
    self._reader.close()


def _ignore(signum, frame):
  """The Python-level handler: Signals' thread has already acted on the signal's wake-up byte."""
  del signum, frame


class ControlFile:
  """One control file, polled. A file that exists when polling starts belongs to another run started in the same
  folder, or was left from an earlier one: it is not obeyed (nor removed) until it is created anew (or touched),
  or until it has been gone once. With `own`, such a file is this run's alone and is removed instead.

  A file on a store (RUN/train_quit of a gs:// run) is asked about every STORE_POLL_SECONDS at most: each question
  is a request to the store."""
  STORE_POLL_SECONDS = 5.0

  def __init__(self, path, own=False):
    self.path = path
    self._every = 0.0 if paths_lib.is_local(path) else self.STORE_POLL_SECONDS
    self._asked, self._answer = -float("inf"), None
    self._ignored = self._identity()
    if self._ignored and own:
      logging.warning("Removing control file %s left from an earlier run of this directory (not obeyed).",
                      paths_lib.normalise(path))
      tf.io.gfile.remove(path)
      self._ignored = None
    elif self._ignored:
      logging.warning("Control file %s exists already (another run's, or left from an earlier one): not obeyed "
                      "unless created again.", paths_lib.normalise(path))

  def _identity(self):
    return paths_lib.identity(self.path)

  def present(self):
    now = time.monotonic()
    if now - self._asked >= self._every:
      self._asked = now
      identity = self._identity()
      if identity is None:
        self._ignored = None
      self._answer = identity is not None and identity != self._ignored
    return self._answer


def run_files(folder, name, flag_path, own):
  """FOLDER/<name>, the control file of one run alone (its owner, the chief, removes one left from an earlier run),
  and the file of the flag, which other runs started in the same working directory share."""
  path = os.path.join(folder, name)
  files = [ControlFile(path, own=own)]
  if not paths_lib.same(flag_path, path):
    files.append(ControlFile(flag_path))
  return files


class Control:
  """Quit and pause requests from control files and signals, turned into the trainer's `request` variable.

  quit_files and pause_files: ControlFiles. A watcher thread polls them twice a second; every step reads the
  variable, so a request stops the compiled loop after the step in flight (or the one after it, if it came late in
  that step). `signals` (a Signals) routes a first SIGINT or SIGTERM here as a quit.
  """
  POLL_SECONDS = 0.5

  def __init__(self, quit_files, pause_files, request, signals=None):
    self.quit_files, self.pause_files = quit_files, pause_files
    self.request = request
    self.quit_reason = None
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True, name="control-files")
    self._thread.start()
    self._signals = signals
    if signals is not None:
      signals.install()
      signals.graceful = self._on_signal

  def _on_signal(self, name):
    logging.info("%s received: finishing the current step, then checkpoint and exit (a second %s exits at once).",
                 name, name)
    self.quit_reason = name
    self.request.assign(REQUEST_QUIT)

  def _watch(self):
    while not self._done.wait(self.POLL_SECONDS):
      if not self.quit_reason:
        quit_file = next((f for f in self.quit_files if f.present()), None)
        if quit_file:
          self.quit_reason = f"quit file {quit_file.path}"
      if self.quit_reason:
        self.request.assign(REQUEST_QUIT)
      elif self.pause_requested():
        self.request.assign(REQUEST_PAUSE)

  def pause_requested(self):
    return any(f.present() for f in self.pause_files)

  def wait_while_paused(self):
    """Blocks, sleeping, until the pause files are gone or a quit is requested."""
    logging.info("Paused: remove %s to continue (or create %s / send SIGTERM to quit).",
                 " or ".join(paths_lib.normalise(f.path) for f in self.pause_files if f.present()),
                 " or ".join(f.path for f in self.quit_files))
    while self.pause_requested() and not self.quit_reason:
      time.sleep(1.0)
    if not self.quit_reason:
      logging.info("Pause file removed: continuing.")
      self.request.assign(REQUEST_NONE)

  def honour(self, request, step, save_checkpoint):
    """After a compiled loop stopped for `request` (summed over workers): checkpoints, then returns True when the
    program must exit (a quit), or waits while this worker's pause file exists (another worker's pause: its next
    step waits for it) and returns False."""
    save_checkpoint("quit" if request == REQUEST_QUIT else "pause")
    if request == REQUEST_QUIT:
      logging.info("Stopped at step %d (%s).", step, self.quit_reason or "another worker asked to quit")
      return True
    if self.pause_requested():
      self.wait_while_paused()  # a quit while paused stops everyone after one more step
    else:
      logging.info("Another worker paused the run: waiting for it in the next step.")
    return False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    self._done.set()
    if self._signals is not None:
      self._signals.graceful = None
