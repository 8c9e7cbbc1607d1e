"""Which servers of a run are live, and which ledger position each has put in force.

A server keeps `servers/HOST-PID.json` in the run directory: its pid, host, process start
time, the newest ledger number it has folded into what it serves (`seen`) and when it last
said so (`beat`). It rewrites the file (atomically) whenever `seen` moves, and once a second
while idle. `wait(run_dir, seq)`, which every unlearn runs after its commit, returns once
each live server has seen `seq`: when an unlearn returns, every server of the run on this
host has it in force, whichever process asked for it. A file whose process is gone (a pid
that died or was reused) is removed; a server on another host counts as live while its
beat is fresh.
"""

from __future__ import annotations

import json
import os
import socket
import time

import psutil

DIR = "servers"
BEAT_S = 1.0        # how often an idle server says it is alive
STALE_S = 10.0      # a server on another host is gone after this long without a beat


class Presence:
  """A server's entry (one per serving process)."""

  def __init__(self, run_dir: str):
    self.dir = os.path.join(run_dir, DIR)
    os.makedirs(self.dir, exist_ok=True)
    self.pid, self.host = os.getpid(), socket.gethostname()
    self.path = os.path.join(self.dir, f"{self.host}-{self.pid}.json")
    self.started = psutil.Process(self.pid).create_time()
    self.seen, self.beat = -1, 0.0

  def confirm(self, seen: int):
    """Say that ledger entries up to `seen` are in force (written when it moves, or as a beat)."""
    now = time.time()
    if seen == self.seen and now - self.beat < BEAT_S:
      return
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      json.dump({"pid": self.pid, "host": self.host, "started": self.started, "seen": seen,
                 "beat": now}, f)
    os.replace(tmp, self.path)
    self.seen, self.beat = seen, now

  def close(self):
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass


def _live(entry: dict) -> bool:
  if entry.get("host") != socket.gethostname():
    return time.time() - entry.get("beat", 0) < STALE_S
  try:
    return abs(psutil.Process(entry["pid"]).create_time() - entry["started"]) < 1e-3
  except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
    return False


def servers(run_dir: str) -> dict[str, dict]:
  """The live servers' entries by file name (a dead server's file is removed)."""
  out = {}
  try:
    names = os.listdir(os.path.join(run_dir, DIR))
  except FileNotFoundError:
    return out
  for name in names:
    if not name.endswith(".json"):
      continue
    path = os.path.join(run_dir, DIR, name)
    try:
      with open(path) as f:
        entry = json.load(f)
    except (FileNotFoundError, ValueError):   # removed meanwhile, or not yet replaced whole
      continue
    if _live(entry):
      out[name[:-len(".json")]] = entry
    else:
      try:
        os.remove(path)
      except FileNotFoundError:
        pass
  return out


def wait(run_dir: str, seq: int, timeout: float) -> dict:
  """Block until every live server of the run has ledger entry `seq` in force, or `timeout`
  seconds. -> {"servers": how many, "waited_s", "late": names of those that did not confirm}."""
  start, poll = time.monotonic(), 0.001
  while True:
    live = servers(run_dir)
    late = sorted(name for name, e in live.items() if e["seen"] < seq)
    waited = time.monotonic() - start
    if not late or waited > timeout:
      return {"servers": len(live), "waited_s": waited, "late": late}
    time.sleep(poll)
    poll = min(1.5 * poll, 0.02)
