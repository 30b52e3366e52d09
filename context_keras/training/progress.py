"""Progress lines of long passes: done/total, rate and ETA, at most every few seconds (evaluate, linear_eval)."""
import time

from absl import logging


def duration(seconds):
  """h:mm:ss."""
  seconds = int(round(max(seconds, 0)))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Counts work done and logs 'WHAT: done/total UNIT (p%), r UNIT/s, ETA h:mm:ss' at most every `every` seconds,
  and once more at the end."""

  def __init__(self, what, total=None, unit="images", every=10.0):
    self.what, self.total, self.unit, self.every = what, total, unit, every
    self.done = 0
    self.start = self.last = time.monotonic()

  @property
  def rate(self):
    elapsed = time.monotonic() - self.start
    return self.done / elapsed if elapsed > 0 else 0.0

  def line(self):
    rate = self.rate
    if self.total:
      eta = duration((self.total - self.done) / rate) if rate > 0 else "?"
      return (f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
              f"{rate:.1f} {self.unit}/s, ETA {eta}")
    return f"{self.what}: {self.done} {self.unit}, {rate:.1f} {self.unit}/s"

  def add(self, count):
    self.done += int(count)
    now = time.monotonic()
    if now - self.last >= self.every:
      self.last = now
      logging.info("%s", self.line())

  def finish(self):
    logging.info("%s; done in %s", self.line(), duration(time.monotonic() - self.start))
