"""Every GPU figure of the engine, in stages that each fit one call of a lent GPU (< 600 s).

A GPU may be at hand for only 15 minutes in all, and a call may be cut off: each stage
writes one JSON line per measurement to OUT/STAGE.jsonl as soon as it is made, and ends
with a {"stage_done": ...} line. Between calls, `next` reads what came back and prints the
command of the next stage to run (with what earlier stages decided, e.g. the micro-batch
that fits); `summary` prints the figures.

  sinkformer/bench/gpu/wheels.sh .whl                   # here, where PyPI is reachable
  python3 sinkformer/bench/gpu/check.py kernels --wheels .whl --out $OUT   # there, a call a stage
  python3 sinkformer/bench/gpu/check.py next --results DIR   # here: the next stage's command
  python3 sinkformer/bench/gpu/check.py summary --results DIR

Stages:
  kernels   the wheels import cleanly; the attention backends against XLA on the GPU
            (tests/test_attention.py, tolerances for TF32/bf16); each backend's forward and
            backward on packed 16 x 1024 rows of 32 documents (`bench attention`)
  memory    per remat policy, memory per micro-batch row at 32 layers and the largest
            micro-batch that fits (`bench memory`)
  mfu       compile, first step, step time, tokens/s and MFU of the NULL and the dense control
            at 32 layers and the largest micro-batch of `dots` (`bench mfu`)
  peer      the PyTorch peer (gpu/peer_torch.py, torch.compile) at the same geometry,
            depth, rows per micro-batch and accumulation, plain causal and packed, beside
            the NULL on the same batching, in one call
  pipeline  the quickstart trained on the GPU (the fraction of each step spent waiting for
            data); the input pipeline on this host's CPUs at 600k sources against the 1B
            model's consumption
`--dry` runs every stage in seconds on a CPU (the smoke model, small shapes): what CI tests.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

STAGES = ("kernels", "memory", "mfu", "peer", "pipeline")
IMPORTS = ("sinkformer.cli", "sinkformer.bench.steps", "sinkformer.train.trainer",
           "sinkformer.train.report", "sinkformer.data.pipeline", "sinkformer.data.prepare",
           "sinkformer.model.flash", "sinkformer.run.switchboard", "grain", "array_record",
           "ml_collections", "tensorboardX", "cloudpickle")
# What the lent GPU's Python already has (its image): the carried wheels (gpu/wheels.sh)
# must bring everything else the stages import, with every dependency of theirs.
IMAGE = {"absl-py", "etils", "numpy", "protobuf", "psutil", "pyyaml", "packaging", "jax",
         "jaxlib", "flax", "optax", "orbax-checkpoint", "scipy", "sentencepiece", "httpx",
         "tqdm", "matplotlib", "safetensors", "pytest", "torch", "triton", "msgpack",
         "tensorstore", "typing-extensions", "importlib-resources", "zipp", "fsspec"}
TESTS = """
import json, sys, pytest, jax
class Count:   # one summary line: how many passed, failed, skipped, on which platform
  got = {}
  def pytest_runtest_logreport(self, report):
    if report.when == "call" or report.outcome == "skipped":
      self.got[report.outcome] = self.got.get(report.outcome, 0) + 1
count = Count()
code = int(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[count]))
print(json.dumps({"tests": sys.argv[1], "exit": code, "platform": jax.default_backend(),
                  **count.got}))
sys.exit(code)
"""
QUICKSTART = """
import json, shutil, subprocess, sys
run = "/tmp/sinkformer-gpu-quickstart"
shutil.rmtree(run, ignore_errors=True)
subprocess.run([sys.executable, "-m", "sinkformer", "train", "--config", sys.argv[1],
                "--workdir", run], check=True)
rows = [json.loads(l) for l in open(run + "/metrics.jsonl") if '"data_frac"' in l]
rows = rows[1:] or rows   # the first interval holds the compile
print(json.dumps({"bench": "quickstart", "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
                  "data_frac": sum(r["data_frac"] for r in rows) / len(rows)}))
"""
PEER_GEOMETRY = ("--d_model", "960", "--heads", "15", "--kv_heads", "5", "--head_dim", "128",
                 "--mlp", "8192", "--vocab", "49152", "--seq_len", "1024")
DRY_GEOMETRY = ("--d_model", "64", "--heads", "4", "--kv_heads", "2", "--head_dim", "16",
                "--mlp", "128", "--vocab", "512", "--seq_len", "128")


def _setting(dry: bool) -> dict:
  if dry:
    return {"config": "experiments/quickstart.py:smoke", "layers": "2", "rows": "2",
            "length": "128", "docs": "4", "rounds": "2", "scale": "20000",
            "peer": DRY_GEOMETRY + ("--steps", "2", "--no_compile"), "seq_len": "128"}
  return {"config": "experiments/wiki_1b.py", "layers": "32", "rows": "16", "length": "1024",
          "docs": "32", "rounds": "5", "scale": "600000", "peer": PEER_GEOMETRY,
          "seq_len": "1024"}


def _commands(stage: str, s: dict, rows: int, accum: int) -> list[tuple[str, list[str], int]]:
  """(name, command, timeout in seconds) of a stage's measurements, in order."""
  py = [sys.executable]
  cli = py + ["-m", "sinkformer"]
  model = ["--config", s["config"], f"--config.model.num_layers={s['layers']}",
           "--config.mesh.data=1", "--config.mesh.fsdp=1"]
  batching = [f"--config.train.batch_size={rows * accum}", f"--config.train.grad_accum={accum}",
              "--config.model.remat=dots"]
  if stage == "kernels":
    tests = ["-k", "cudnn or visits or resolved"] if s["layers"] == "2" else []
    return [("imports", py + ["-c", "import importlib, json; [importlib.import_module(m) for m in "
                              f"{IMPORTS!r}]; print(json.dumps({{'imports': 'ok'}}))"], 60),
            ("attention_test", py + ["-c", TESTS, "tests/test_attention.py", *tests], 240),
            ("attention", cli + ["bench", "attention", "--config", s["config"], "--rows", s["rows"],
                                 "--length", s["length"], "--docs", s["docs"],
                                 "--rounds", s["rounds"]], 240)]
  if stage == "memory":
    return [("memory", cli + ["bench", "memory", *model, "--rows", "2,4"], 540)]
  if stage == "mfu":
    return [("mfu", cli + ["bench", "mfu", *model, *batching, "--rounds", s["rounds"]], 540)]
  if stage == "peer":
    peer = py + ["sinkformer/bench/gpu/peer_torch.py", "--layers", s["layers"], "--rows", str(rows),
                 "--accum", str(accum), *s["peer"]]
    return [("null", cli + ["bench", "mfu", *model, *batching, "--rounds", s["rounds"]], 240),
            ("peer_causal", peer + ["--docs", "1"], 150),
            ("peer_packed", peer + ["--docs", s["docs"]], 150)]
  if stage == "pipeline":
    config = "experiments/quickstart.py" + (":smoke" if s["layers"] == "2" else "")
    return [("quickstart", py + ["-c", QUICKSTART, config], 200),
            ("scale", cli + ["bench", "scale", "--docs", s["scale"],
                             "--dir", "/tmp/sinkformer-gpu-scale"], 200),
            ("stream", cli + ["bench", "stream", "--data", "/tmp/sinkformer-gpu-scale/prepared",
                              "--rows", "16", "--seq_len", s["seq_len"], "--workers", "1,2,4"],
             120)]
  raise SystemExit(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")


def _install(wheels: str) -> dict:
  """Install `wheels` (a folder of .whl) into a private site folder; the environment to run
  with. Nothing is fetched: the machine may have no network."""
  site = "/tmp/sinkformer-site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                  "--no-compile", "--no-cache-dir", "--upgrade", "--target", site,
                  *sorted(glob.glob(os.path.join(wheels, "*.whl")))], check=True)
  return {"PYTHONPATH": os.pathsep.join([os.getcwd(), site, os.environ.get("PYTHONPATH", "")])}


def run_stage(stage: str, out: str, wheels: str | None, dry: bool, rows: int, accum: int):
  os.makedirs(out, exist_ok=True)
  env = {**os.environ, "PYTHONUNBUFFERED": "1",
         "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
  if wheels:
    env.update(_install(wheels))
  log = os.path.join(out, f"{stage}.jsonl")
  with open(log, "a") as f:
    f.write(json.dumps({"stage": stage, "started": time.time(), "rows": rows,
                        "accum": accum, "dry": dry}) + "\n")
  for name, command, limit in _commands(stage, _setting(dry), rows, accum):
    print(f"== {stage}/{name}: {' '.join(command)}", flush=True)
    t0 = time.time()
    try:
      proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=limit)
      rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
      rc, text = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(
          e.stdout, bytes) else (e.stdout or "")
    print(text[-4000:], flush=True)
    got = [json.loads(l) for l in text.splitlines() if l.startswith("{")]
    record = {"name": name, "rc": rc, "seconds": time.time() - t0,
              "result": got[-1] if got else None,
              "tail": None if rc == 0 else text[-1500:]}
    with open(log, "a") as f:   # as it goes: a call cut off still returns what it measured
      f.write(json.dumps(record) + "\n")
    print(f"   ({stage}/{name}: exit {rc}, {record['seconds']:.0f} s)", flush=True)
  with open(log, "a") as f:
    f.write(json.dumps({"stage_done": stage}) + "\n")


def _records(results: str) -> dict[str, list[dict]]:
  out = {}
  for stage in STAGES:
    path = os.path.join(results, f"{stage}.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        out[stage] = [json.loads(l) for l in f if l.strip()]
  return out


def _result(records, stage: str, name: str) -> dict | None:
  for r in reversed(records.get(stage, [])):
    if r.get("name") == name and r.get("rc") == 0:
      return r["result"]
  return None


def _batching(records) -> tuple[int, int]:
  """(rows per micro-batch, accumulation) for mfu and peer: the largest micro-batch of
  `dots` the memory stage found (at most 16 rows), accumulated to 16 rows a step."""
  got = _result(records, "memory", "memory")
  fit = (got or {}).get("policies", {}).get("dots", {}).get("largest_rows_per_device") or 4
  rows = max(1, min(16, int(fit)))
  return rows, max(1, 16 // rows)


def next_command(results: str, dry: bool = False) -> str | None:
  records = _records(results)
  for stage in STAGES:
    if not any("stage_done" in r for r in records.get(stage, [])):
      rows, accum = _batching(records)
      extra = f" --rows {rows} --accum {accum}" if stage in ("mfu", "peer") else ""
      return (f"python3 sinkformer/bench/gpu/check.py {stage}{extra} --wheels .whl --out $OUT"
              + (" --dry" if dry else ""))
  return None


def summary(results: str) -> list[str]:
  records = _records(results)
  lines = []
  att = _result(records, "kernels", "attention")
  if att:
    lines.append(f"attention ({att['rows']}x{att['length']}, {att['docs']} documents a row): " +
                 ", ".join(f"{b} {v['fwd_bwd_ms']:.2f} ms" if "fwd_bwd_ms" in v else f"{b} -"
                           for b, v in att["backends"].items())
                 + f"; flash visits {100 * att['pallas_blocks_visited']:.1f}% of causal blocks")
  test = next((r for r in records.get("kernels", []) if r.get("name") == "attention_test"), None)
  if test and test["result"]:
    t = test["result"]
    lines.append(f"attention tests on {t['platform']}: {t.get('passed', 0)} passed, "
                 f"{t.get('failed', 0)} failed, {t.get('skipped', 0)} skipped")
  mem = _result(records, "memory", "memory")
  if mem:
    lines.append("memory: " + ", ".join(f"{p} {v['largest_rows_per_device']} rows"
                                        for p, v in mem["policies"].items()))
  for stage, name in (("mfu", "mfu"), ("peer", "null")):
    r = _result(records, stage, name)
    if r:
      lines.append(f"{stage}/{name}: {r['rows']} rows (accum {r['grad_accum']}), compile + first "
                   f"step {r['null_compile_s'] + r['null_first_step_s']:.0f} s, NULL MFU "
                   f"{100 * r['null_mfu']:.1f}% ({r['null_tokens_per_s']:,.0f} tok/s), dense "
                   f"{100 * r['dense_mfu']:.1f}%, NULL/dense {r['ratio']:.3f}")
  null = _result(records, "peer", "null")
  for name in ("peer_causal", "peer_packed"):
    r = _result(records, "peer", name)
    if r:
      ratio = f"; NULL / peer {null['null_tokens_per_s'] / r['tokens_per_s']:.2f}" if null else ""
      lines.append(f"{name} ({r['attention']}): {r['tokens_per_s']:,.0f} tok/s{ratio}")
  quick = _result(records, "pipeline", "quickstart")
  if quick:
    lines.append(f"quickstart: data wait {100 * quick['data_frac']:.1f}% of each step, "
                 f"{quick['tokens_per_s']:,.0f} tok/s")
  stream = _result(records, "pipeline", "stream")
  if stream:
    best = max(v["tokens_per_s"] for v in stream["per_thread_count"].values())
    model = (_result(records, "mfu", "mfu") or {}).get("null_tokens_per_s")
    lines.append(f"stream: {best:,.0f} tok/s" + (f" = {best / model:.1f}x what the mfu stage's NULL "
                                                  "trains at" if model else ""))
  return lines


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("stage", choices=STAGES + ("next", "summary"))
  p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
  p.add_argument("--results", help="for next/summary: the folder the stages' files came back to")
  p.add_argument("--wheels", help="a folder of wheels to install first (gpu/wheels.sh)")
  p.add_argument("--rows", type=int, default=4, help="rows per micro-batch (mfu, peer)")
  p.add_argument("--accum", type=int, default=4, help="micro-batches per step (mfu, peer)")
  p.add_argument("--dry", action="store_true", help="small shapes on a CPU, in seconds")
  a = p.parse_args()
  os.chdir(os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))   # the repo
  if a.stage == "next":
    command = next_command(a.results or a.out, a.dry)
    print(command or "every stage is done; python3 sinkformer/bench/gpu/check.py summary "
          "--results DIR")
  elif a.stage == "summary":
    print("\n".join(summary(a.results or a.out)) or "no results yet")
  else:
    run_stage(a.stage, a.out, a.wheels, a.dry, a.rows, a.accum)


if __name__ == "__main__":
  main()
