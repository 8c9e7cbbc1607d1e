"""Where training progress goes: one stdout line, metrics.jsonl, TensorBoard events, a bar.

Only process 0 writes; other processes get a Reporter that does nothing, so callers never
branch on the process index. TensorBoard files are written by tensorboardX (no TensorFlow).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax


def human(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


def duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Reporter:

  def __init__(self, workdir: str, total_steps: int, first_step: int = 0):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from tensorboardX import SummaryWriter
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self.sources = open(os.path.join(workdir, "sources.jsonl"), "a")
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    self.bar = None
    if sys.stdout.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)

  def started(self):
    """The clock of the bar's rate and ETA starts here (after compiling, not before)."""
    if self.active and self.bar is not None:
      self.bar.reset(self.bar.total)
      self.bar.update(self.bar.initial)   # reset() forgets where a resume started

  def line(self, text: str):
    if not self.active:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def scalars(self, step: int, values: dict, prefix: str):
    if not self.active:
      return
    self.jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **values}) + "\n")
    self.jsonl.flush()
    for name, value in values.items():
      self.tb.add_scalar(f"{prefix}/{name}", value, step)

  def per_source(self, step: int, sources, loss, tokens):
    """Mean loss and token count per source seen since the last call (one JSON line)."""
    if self.active:
      self.sources.write(json.dumps({"step": step, "source_id": sources.tolist(),
                                     "loss": loss.round(5).tolist(), "tokens": tokens.tolist()}) + "\n")

  def flush(self):
    """Everything written so far onto disk (before the run directory is pushed to a bucket)."""
    if self.active:
      self.jsonl.flush()
      self.sources.flush()
      self.tb.flush()

  def advance(self, steps: int):
    if self.active and self.bar is not None:
      self.bar.update(steps)

  def postfix(self, text: str):
    if self.active and self.bar is not None:
      self.bar.set_postfix_str(text)

  def close(self):
    if self.active:
      if self.bar is not None:
        self.bar.close()
      self.jsonl.close()
      self.sources.close()
      self.tb.close()
