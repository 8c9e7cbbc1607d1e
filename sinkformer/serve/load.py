"""A load test of `sinkformer serve`: real server processes on 127.0.0.1, real HTTP clients.

For each server setting (batched, and one prompt at a time) and each number of concurrent
clients, every client sends completions one after another, in random modes (a random
source's own sinks, or routing a random source's title), while an administrator unlearns
random sources. It records each request's send time, latency, status, tokens and the source
its response says it used, and each unlearn call's return time, then checks what a
deployment must guarantee: no response used a source whose unlearn call had returned
before the request was sent; every unlearn call is in the ledger; no 5xx. An unlearn is in
force once its call returns, so its latency under load is the deletion-to-effect time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

from sinkformer.serve import switchboard


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_server(run_dir: str, token: str, max_batch: int, timeout: float = 300):
  """A `sinkformer serve` process on a free local port; yields its base URL."""
  port = _free_port()
  with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as f:
    f.write(token)
  proc = subprocess.Popen([sys.executable, "-m", "sinkformer", "serve", "--run", run_dir,
                           "--port", str(port), "--token_file", f.name,
                           "--max_batch", str(max_batch)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + timeout
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f"the server exited: {proc.stdout.read()[-2000:]}")
      try:
        if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      if time.monotonic() > deadline:
        raise RuntimeError("the server did not answer /healthz in time")
      time.sleep(0.2)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
    os.unlink(f.name)


async def _round(url: str, token: str, clients: int, requests: int, unlearns: int,
                 sources: list[dict], max_tokens: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  done, gone, took = [], [], []   # completions; (source id, returned at, ...); unlearn times
  async with httpx.AsyncClient(base_url=url, timeout=600) as http:

    async def client(c: int):
      for _ in range(requests):
        target = sources[rng.integers(len(sources))]
        mode = "route" if rng.random() < 0.5 else f"source:id:{target['id']}"
        sent = time.monotonic()
        r = await http.post("/v1/completions", json={
            "prompt": target["title"], "max_tokens": max_tokens, "mode": mode,
            "temperature": 0.0 if rng.random() < 0.5 else 0.8, "seed": int(rng.integers(1000))})
        body = r.json()
        used = [int(m.group(1)) for ch in body.get("choices", [])
                if (m := re.search(r"\(id (\d+)\)$", ch.get("source") or ""))]
        done.append({"sent": sent, "latency": time.monotonic() - sent, "status": r.status_code,
                     "tokens": body.get("usage", {}).get("completion_tokens", 0),
                     "used": used, "asked": target["id"] if mode != "route" else None})

    async def admin():
      for _ in range(unlearns):
        await asyncio.sleep(float(rng.uniform(0.05, 0.3)))
        victim = sources[rng.integers(len(sources))]
        asked = time.monotonic()
        r = await http.post("/v1/unlearn", headers={"Authorization": f"Bearer {token}"},
                            json={"sources": [f"id:{victim['id']}"], "reason": "load test"})
        gone.append((victim["id"], time.monotonic(), r.status_code, r.json().get("request_id")))
        took.append(time.monotonic() - asked)

    t0 = time.monotonic()
    await asyncio.gather(admin(), *(client(c) for c in range(clients)))
    wall = time.monotonic() - t0
  returned = {}
  for source, at, _, _ in gone:
    returned.setdefault(source, at)
  leaks = [d for d in done if d["status"] == 200
           and any(s in returned and d["sent"] > returned[s] for s in d["used"])]
  ok = [d for d in done if d["status"] == 200]
  latency = np.asarray([d["latency"] for d in ok] or [np.nan])
  return {"clients": clients, "requests": len(done), "ok": len(ok),
          "refused": sum(d["status"] == 403 for d in done),
          "server_errors": sum(d["status"] >= 500 for d in done)
          + sum(status >= 500 for *_, status, _ in gone),
          "leaks": len(leaks), "unlearned": [(s, rid) for s, _, _, rid in gone],
          "p50_s": float(np.percentile(latency, 50)), "p99_s": float(np.percentile(latency, 99)),
          # an unlearn is in force for every request sent after its call returns
          "unlearn_p50_s": float(np.percentile(took, 50)) if took else None,
          "unlearn_max_s": max(took) if took else None,
          "tokens_per_s": sum(d["tokens"] for d in ok) / wall, "wall_s": wall}


def run(run_dir: str, clients=(1, 8, 32), requests: int = 4, unlearns: int = 3,
        max_tokens: int = 16, settings=(("batched", 32), ("one at a time", 1)), log=print) -> dict:
  """The load test on a scratch copy of `run_dir` (its switchboard is written to)."""
  token = secrets.token_urlsafe(24)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, max_batch in settings:
      scratch = os.path.join(tmp, name.replace(" ", "-"))
      os.makedirs(scratch)
      for item in ("config.json", switchboard.FILE):
        shutil.copy(os.path.join(run_dir, item), scratch)
      os.symlink(os.path.abspath(os.path.join(run_dir, "checkpoints")),
                 os.path.join(scratch, "checkpoints"))
      board = switchboard.Switchboard(scratch)
      sources = board.page("active", 0, 10**9)
      board.close()
      with running_server(scratch, token, max_batch) as url:
        asyncio.run(_round(url, token, 1, 1, 0, sources, max_tokens, 0))   # compile first
        rounds = []
        for c in clients:
          got = asyncio.run(_round(url, token, c, requests, unlearns, sources, max_tokens, c))
          log(f"{name}: {c:3d} clients, {got['requests']} requests: p50 {1e3 * got['p50_s']:.0f} "
              f"ms, p99 {1e3 * got['p99_s']:.0f} ms, {got['tokens_per_s']:.0f} tok/s; unlearn "
              f"in force after {1e3 * (got['unlearn_max_s'] or 0):.0f} ms at most; "
              f"{got['refused']} refused, {got['leaks']} leaks, {got['server_errors']} 5xx")
          rounds.append(got)
      board = switchboard.Switchboard(scratch)
      ledger = {e["request_id"] for e in board.ledger()}
      board.close()
      lost = [rid for got in rounds for _, rid in got["unlearned"] if rid and rid not in ledger]
      results[name] = {"rounds": rounds, "lost_ledger_entries": len(lost)}
  return results
