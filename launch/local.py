#!/usr/bin/env python3
"""Start N sinkformer processes on this machine, as N hosts would run them (CPU, gloo).

  python launch/local.py --processes 2 --devices 4 -- \\
      sinkformer train --config experiments/quickstart.py:smoke --workdir runs/mp

Each process gets SINKFORMER_COORDINATOR/NUM_PROCESSES/PROCESS_ID and `--devices` simulated
CPU devices; process 0 prints to this terminal, the others write to log files
(`--logs DIR`). Exits with the first non-zero status, after stopping the rest.
"""

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=1, help="simulated CPU devices per process")
  parser.add_argument("--logs", default="launch-logs", help="where processes 1.. write output")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --")
  if command[0] == "sinkformer":     # the same interpreter as this launcher
    command = [sys.executable, "-m", "sinkformer", *command[1:]]

  os.makedirs(args.logs, exist_ok=True)
  coordinator = f"127.0.0.1:{free_port()}"
  procs = []
  for i in range(args.processes):
    env = {**os.environ, "SINKFORMER_COORDINATOR": coordinator,
           "SINKFORMER_NUM_PROCESSES": str(args.processes), "SINKFORMER_PROCESS_ID": str(i),
           "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(args.devices)}
    out = None if i == 0 else open(os.path.join(args.logs, f"process_{i}.log"), "w")
    procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None))

  status = 0
  while any(p.poll() is None for p in procs):
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if failed:
      status = failed[0]
      for p in procs:
        if p.poll() is None:
          p.terminate()
      break
    time.sleep(0.2)
  codes = [p.wait() for p in procs]
  status = status or next((c for c in codes if c), 0)
  if status:
    print(f"launch/local.py: a process failed (exit codes {codes}); logs in {args.logs}/",
          file=sys.stderr)
  sys.exit(status)


if __name__ == "__main__":
  main()
