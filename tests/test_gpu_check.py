"""The prepared GPU script (bench/gpu/check.py): every stage runs (dry, on this CPU), writes
its measurements as it goes, and `next` chains the stages; the wheels it carries make a
clean import possible on the GPU image."""

import glob
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest

sys.path.insert(0, "sinkformer/bench/gpu")
import check as gpu_check  # noqa: E402


def stage(name, out, *extra):
  return subprocess.run([sys.executable, "sinkformer/bench/gpu/check.py", name, "--dry",
                         "--out", str(out),
                         *extra], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_every_stage_runs_records_as_it_goes_and_next_chains_them(tmp_path):
  nxt = lambda: gpu_check.next_command(str(tmp_path), dry=True)
  assert nxt() == "python3 sinkformer/bench/gpu/check.py kernels --wheels .whl --out $OUT --dry"
  for name in gpu_check.STAGES:
    command = nxt()
    assert command.split()[2] == name
    extra = command.split(name, 1)[1].split("--wheels")[0].split()   # --rows/--accum it chose
    proc = stage(name, tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(l) for l in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert records[0]["stage"] == name and records[-1] == {"stage_done": name}
    measured = records[1:-1]
    assert measured and all(r["rc"] == 0 and r["result"] for r in measured), measured
  assert nxt() is None
  text = "\n".join(gpu_check.summary(str(tmp_path)))
  assert ", 0 failed" in text
  for needle in ("attention (2x128", "memory: ", "mfu/mfu: ", "peer/null: ", "peer_causal (sdpa)",
                 "peer_packed (sdpa+mask)", "NULL / peer", "quickstart: data wait",
                 "stream: ", "attention tests on cpu: "):
    assert needle in text, (needle, text)


def test_next_takes_the_micro_batch_the_memory_stage_found(tmp_path):
  for name, result in (("kernels", {"imports": "ok"}),
                       ("memory", {"bench": "memory", "policies": {
                           "dots": {"largest_rows_per_device": 6}}})):
    (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"stage": name}, {"name": name, "rc": 0, "result": result}, {"stage_done": name})))
  assert gpu_check.next_command(str(tmp_path)) == (
      "python3 sinkformer/bench/gpu/check.py mfu --rows 6 --accum 2 --wheels .whl --out $OUT")
  # a stage cut off mid-call (no stage_done) is run again
  (tmp_path / "mfu.jsonl").write_text(json.dumps({"stage": "mfu"}) + "\n")
  assert gpu_check.next_command(str(tmp_path)).split()[2] == "mfu"


@pytest.mark.slow
def test_the_carried_wheels_complete_the_gpu_image(tmp_path):
  """Downloads the Python 3.12 wheels as a user would (PyPI): each import the stages need
  beyond the image has its wheel, and every wheel's own requirements are in the set or in
  the image."""
  out = subprocess.run(["bash", "sinkformer/bench/gpu/wheels.sh", str(tmp_path)],
                       capture_output=True,
                       text=True, timeout=600)
  if out.returncode != 0 and "No matching distribution" not in out.stderr and (
      "Could not" in out.stderr or "connection" in out.stderr.lower()):
    pytest.skip(f"PyPI unreachable: {out.stderr.strip().splitlines()[-1]}")
  assert out.returncode == 0, out.stderr[-2000:]
  norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
  wheels = {norm(os.path.basename(w).split("-")[0]): w for w in glob.glob(f"{tmp_path}/*.whl")}
  for module, dist in (("grain", "grain"), ("array_record", "array-record"),
                       ("ml_collections", "ml-collections"), ("tensorboardX", "tensorboardx"),
                       ("cloudpickle", "cloudpickle")):
    assert dist in wheels, (module, sorted(wheels))
  have = set(wheels) | gpu_check.IMAGE
  for name, path in wheels.items():
    with zipfile.ZipFile(path) as z:
      meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
      if line.startswith("Requires-Dist:") and "extra ==" not in line and "win32" not in line:
        need = norm(re.match(r"Requires-Dist:\s*([A-Za-z0-9_.\-]+)", line).group(1))
        assert need in have, f"{name} needs {need}: neither carried nor in the image"
