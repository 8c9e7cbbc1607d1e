"""A load test of `sinkformer serve`: a real server process on 127.0.0.1, real HTTP clients,
real `sinkformer unlearn` processes.

For `duration_s`, each of `clients` clients sends completions one after another in random
modes (a random source's own sinks, routing a random source's title, the backbone, the
placebo); some stream, and some of those hang up after their first chunk. Meanwhile an
administrator unlearns random sources, half over HTTP and half with the CLI in another
process. Every response and streamed chunk carries the server's send time (`sent_at`) and
every unlearn its return time (`returned_at`), on the same clock, so the test counts
exactly what a deployment must never do: tokens sent from a source after its unlearn
returned. It also checks that every acknowledged unlearn is in the ledger, counts 5xx, and
reports latency, throughput and how long the server took to confirm each unlearn (the
cross-process delay an unlearn waits for).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

from sinkformer.run import switchboard


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_server(run_dir: str, token: str, max_batch: int, *flags: str, timeout: float = 300):
  """A `sinkformer serve` process on a free local port (more `flags` passed on); yields
  (its base URL, the process)."""
  port = _free_port()
  with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as f:
    f.write(token)
  proc = subprocess.Popen([sys.executable, "-m", "sinkformer", "serve", "--run", run_dir,
                           "--port", str(port), "--token_file", f.name,
                           "--max_batch", str(max_batch), *flags],
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
    yield url, proc
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
    os.unlink(f.name)


def _used(choice) -> int | None:
  m = re.search(r"\(id (\d+)\)$", choice.get("source") or "")
  return int(m.group(1)) if m else None


async def _session(url: str, run_dir: str, token: str, clients: int, duration_s: float,
                   http_unlearns: int, cli_unlearns: int, sources: list[dict], max_tokens: int,
                   seed: int) -> dict:
  rng = np.random.default_rng(seed)
  end = time.monotonic() + duration_s
  sent = []      # per response or chunk: (source used or asked, sent_at, tokens)
  done = []      # per request: status, latency, tokens, stream, hung up
  unlearned = []  # per unlearn: source, how, status, request id, returned_at, waited_s
  victims = [int(i) for i in rng.choice([s["id"] for s in sources], http_unlearns + cli_unlearns,
                                        replace=False)]

  async with httpx.AsyncClient(base_url=url, timeout=600,
                               limits=httpx.Limits(max_connections=clients + 8)) as http:

    async def one(c_rng):
      target = sources[c_rng.integers(len(sources))]
      draw = c_rng.random()
      mode = (f"source:id:{target['id']}" if draw < 0.5 else "route" if draw < 0.8 else
              "backbone" if draw < 0.9 else "placebo")
      stream = c_rng.random() < 0.25
      hang_up = stream and mode.startswith("source:") and c_rng.random() < 0.35
      body = {"prompt": target["title"], "max_tokens": max_tokens, "mode": mode,
              "temperature": 0.0 if c_rng.random() < 0.5 else 0.8,
              "seed": int(c_rng.integers(1000)), "stream": stream}
      asked = target["id"] if mode.startswith("source:") else None
      t0 = time.monotonic()
      if not stream:
        r = await http.post("/v1/completions", json=body)
        tokens = 0
        if r.status_code == 200:
          got = r.json()
          for ch in got["choices"]:
            sent.append((_used(ch), got["sent_at"], ch["tokens"]))
            tokens += ch["tokens"]
        done.append({"status": r.status_code, "latency": time.monotonic() - t0,
                     "tokens": tokens, "stream": False, "hung_up": False})
        return
      chunks, final, status = [], None, None
      async with http.stream("POST", "/v1/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
          if not line.startswith("data: {"):
            continue
          event = json.loads(line[6:])
          if "error" in event:
            status = event["error"]["status"]
            break
          if "finish_reason" in event["choices"][0]:   # the last event: no new tokens
            final = event
          else:
            chunks.append((event["sent_at"], sum(ch["tokens"] for ch in event["choices"])))
            if hang_up:
              break
      source = asked if final is None else _used(final["choices"][0])
      sent.extend((source, at, n) for at, n in chunks)
      done.append({"status": status, "latency": time.monotonic() - t0,
                   "tokens": sum(n for _, n in chunks), "stream": True, "hung_up": hang_up})

    async def client(c: int):
      c_rng = np.random.default_rng((seed, c))
      while time.monotonic() < end:
        await one(c_rng)

    async def admin():
      order = ["http"] * http_unlearns + ["cli"] * cli_unlearns
      rng.shuffle(order)
      for how, victim in zip(order, victims):
        await asyncio.sleep(float(rng.uniform(0.3, 0.9)) * duration_s / len(order))
        if how == "http":
          r = await http.post("/v1/unlearn", headers={"Authorization": f"Bearer {token}"},
                              json={"sources": [f"id:{victim}"], "reason": "load test"})
          got, status = r.json(), r.status_code
        else:
          proc = await asyncio.create_subprocess_exec(
              sys.executable, "-m", "sinkformer", "unlearn", "--run", run_dir, "--reason",
              "load test", "--json", f"id:{victim}", stdout=subprocess.PIPE,
              stderr=subprocess.PIPE)
          out, _ = await proc.communicate()
          status = 200 if proc.returncode == 0 else 500
          got = json.loads(out.decode().splitlines()[0]) if out else {}
        unlearned.append({"source": victim, "how": how, "status": status,
                          "request_id": got.get("request_id"),
                          "returned_at": got.get("returned_at"),
                          "waited_s": got.get("in_force", {}).get("waited_s")})

    t0 = time.monotonic()
    await asyncio.gather(admin(), *(client(c) for c in range(clients)))
    wall = time.monotonic() - t0

  returned = {u["source"]: u["returned_at"] for u in unlearned if u["returned_at"]}
  leaked = sum(n for source, at, n in sent if source in returned and at > returned[source])
  ok = [d for d in done if d["status"] == 200]
  whole = np.asarray([d["latency"] for d in ok if not d["stream"]] or [np.nan])
  waits = [u["waited_s"] for u in unlearned if u["waited_s"] is not None]
  return {"clients": clients, "duration_s": wall, "requests": len(done), "ok": len(ok),
          "streams": sum(d["stream"] for d in done), "hung_up": sum(d["hung_up"] for d in done),
          "refused": sum(d["status"] == 403 for d in done),
          "busy": sum(d["status"] == 429 for d in done),
          "server_errors": sum(d["status"] >= 500 for d in done)
          + sum(u["status"] >= 500 for u in unlearned),
          "p50_s": float(np.percentile(whole, 50)), "p99_s": float(np.percentile(whole, 99)),
          "tokens_per_s": sum(d["tokens"] for d in ok) / wall,
          "tokens_after_unlearn": leaked, "unlearns": unlearned,
          "confirm_max_s": max(waits) if waits else None}


def run(run_dir: str, clients: int = 64, duration_s: float = 30.0, http_unlearns: int = 3,
        cli_unlearns: int = 3, max_tokens: int = 16, max_batch: int = 32, log=print) -> dict:
  """The load test on a scratch copy of `run_dir` (its switchboard is written to)."""
  token = secrets.token_urlsafe(24)
  with tempfile.TemporaryDirectory() as scratch:
    with open(os.path.join(run_dir, "config.json")) as f, \
        open(os.path.join(scratch, "config.json"), "w") as g:
      g.write(f.read())
    switchboard.copy(run_dir, scratch)
    os.symlink(os.path.abspath(os.path.join(run_dir, "checkpoints")),
               os.path.join(scratch, "checkpoints"))
    if os.path.exists(os.path.join(run_dir, "router.npz")):
      os.symlink(os.path.abspath(os.path.join(run_dir, "router.npz")),
                 os.path.join(scratch, "router.npz"))
    board = switchboard.Switchboard(scratch)
    sources = board.page("active", 0, 10**9)
    board.close()
    with running_server(scratch, token, max_batch) as (url, _):
      asyncio.run(_session(url, scratch, token, 1, 0.0, 0, 0, sources, max_tokens, 0))  # compile
      got = asyncio.run(_session(url, scratch, token, clients, duration_s, http_unlearns,
                                 cli_unlearns, sources, max_tokens, 1))
    board = switchboard.Switchboard(scratch)
    ledger = {e["request_id"] for e in board.ledger()}
    board.close()
  got["lost_ledger_entries"] = sum(1 for u in got["unlearns"]
                                   if u["request_id"] and u["request_id"] not in ledger)
  log(table(got))
  return got


def table(got: dict) -> str:
  """The result as a markdown table."""
  rows = [("clients x seconds", f"{got['clients']} x {got['duration_s']:.0f}"),
          ("requests (200 / 403 / 429)", f"{got['requests']} ({got['ok']} / {got['refused']} / "
                                         f"{got['busy']})"),
          ("streams (hung up)", f"{got['streams']} ({got['hung_up']})"),
          ("latency p50 / p99", f"{1e3 * got['p50_s']:.0f} ms / {1e3 * got['p99_s']:.0f} ms"),
          ("tokens/s", f"{got['tokens_per_s']:.0f}"),
          ("5xx", str(got["server_errors"])),
          ("unlearns (HTTP + CLI)", f"{sum(u['how'] == 'http' for u in got['unlearns'])} + "
                                    f"{sum(u['how'] == 'cli' for u in got['unlearns'])}"),
          ("tokens sent from a source after its unlearn returned",
           str(got["tokens_after_unlearn"])),
          ("ledger entries lost", str(got.get("lost_ledger_entries", "-"))),
          ("cross-process delay (server confirmation), max",
           "-" if got["confirm_max_s"] is None else f"{1e3 * got['confirm_max_s']:.0f} ms")]
  width = max(len(k) for k, _ in rows)
  return "\n".join([f"| {'measure':{width}s} | value |", f"|{'-' * (width + 2)}|-------|"]
                   + [f"| {k:{width}s} | {v} |" for k, v in rows])
