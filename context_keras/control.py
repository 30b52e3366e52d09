"""Quit and pause requests, from control files and signals, for a training process.

The original polled `<script>_quit` and `<script>_pause` files in the working directory (method.md §4.4); we do
the same, and treat SIGINT and SIGTERM as a quit. A request becomes the value of a tf.Variable that every compiled
step reads (trainer.py), so it takes effect after the step in flight, at the same step on every worker.
"""
import os
import signal
import threading
import time

from absl import logging

# What a worker asks of all; every step sums the requests of all replicas.
REQUEST_NONE, REQUEST_PAUSE, REQUEST_QUIT = 0, 1, 2


class Control:
  """Quit and pause requests from control files and signals, turned into the trainer's `request` variable.

  A watcher thread polls the files twice a second; every step reads the variable, so a request stops the
  compiled loop after the step in flight (or the one after it, if it came late in that step).
  """
  POLL_SECONDS = 0.5

  def __init__(self, quit_file, pause_file, request):
    self.quit_file, self.pause_file = quit_file, pause_file
    self.request = request
    self.quit_reason = None
    self._done = threading.Event()
    for stale in (quit_file, pause_file):
      if os.path.exists(stale):
        logging.warning("Removing control file %s left from an earlier run (not obeyed).", os.path.abspath(stale))
        os.remove(stale)
    self._thread = threading.Thread(target=self._watch, daemon=True, name="control-files")
    self._thread.start()
    self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

  def _on_signal(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.quit_reason:
      logging.warning("%s again: already stopping (%s).", name, self.quit_reason)
      return
    logging.info("%s received: finishing the current step, then checkpoint and exit.", name)
    self.quit_reason = name
    self.request.assign(REQUEST_QUIT)

  def _watch(self):
    while not self._done.wait(self.POLL_SECONDS):
      if os.path.exists(self.quit_file) and not self.quit_reason:
        self.quit_reason = f"quit file {self.quit_file}"
      if self.quit_reason:
        self.request.assign(REQUEST_QUIT)
      elif self.pause_requested():
        self.request.assign(REQUEST_PAUSE)

  def pause_requested(self):
    return os.path.exists(self.pause_file)

  def wait_while_paused(self):
    """Blocks, sleeping, until the pause file is gone or a quit is requested."""
    logging.info("Paused: remove %s to continue (or create %s / send SIGTERM to quit).",
                 os.path.abspath(self.pause_file), self.quit_file)
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
    for s, handler in self._previous_handlers.items():
      signal.signal(s, handler)
