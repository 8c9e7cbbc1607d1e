"""The `sinkformer` command as a user meets it: help, one-line errors, a real run, the bench."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest


def cli(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "sinkformer", *args], capture_output=True,
                        text=True, timeout=timeout)


def test_help_lists_every_command():
  from sinkformer.cli import COMMANDS
  out = cli("--help")
  assert out.returncode == 0
  for name in COMMANDS:
    assert name in out.stdout
  sub = cli("train", "--help")
  assert sub.returncode == 0 and "--workdir" in sub.stdout and "--config" in sub.stdout


@pytest.mark.parametrize("args,needle", [
    (("train", "--config", "experiments/quickstart.py"), "--workdir is required"),
    (("train", "--config", "experiments/nope.py", "--workdir", "x"), "nope.py"),
    (("train", "--config", "experiments/quickstart.py", "--workdir", "x",
      "--config.model.d_modle=3"), 'Did you mean "d_model"'),
    (("train", "--config", "experiments/quickstart.py", "--workdir", "x",
      "--config.sinks.k=9999"), "config.sinks.k:"),
    (("train", "--config", "experiments/quickstart.py", "--workdir", "x",
      "--config.mesh.data=2"), "config.mesh:"),
    (("frobnicate",), "unknown command"),
    (("data", "fetch"), "name a corpus: wiki-vital"),
    (("data", "fetch", "wiki-everything"), "unknown corpus 'wiki-everything'"),
    (("data", "prepare", "--corpus", "missing.jsonl", "--out", "x"), "'missing.jsonl' not found"),
    (("data", "info", "--data", "/nonexistent"), "not prepared data"),
    (("train", "--bogus=1"), "bogus"),
])
def test_user_mistakes_are_one_line_errors(args, needle, tmp_path):
  out = cli(*args)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("sinkformer: error:") and needle in lines[0]


def test_train_command_runs_and_reports(tmp_path):
  out = cli("train", "--config", "experiments/quickstart.py:smoke", "--workdir", str(tmp_path),
            "--config.train.steps=4", "--config.train.log_every=2", "--config.train.eval_every=4")
  assert out.returncode == 0, out.stderr
  steps = [l for l in out.stdout.splitlines() if l.startswith("step ")]
  assert len(steps) == 2 and steps[-1].startswith("step 4/4")
  for field in ("loss", "tok/s", "MFU", "ETA"):
    assert field in steps[-1]
  assert any(l.startswith("eval 4:") for l in out.stdout.splitlines())
  assert (tmp_path / "metrics.jsonl").exists()


def test_bench_sinks_prints_a_json_ratio():
  out = cli("bench", "sinks", "--config", "experiments/quickstart.py:smoke", "--rounds", "2")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["bench"] == "sinks" and result["ratio"] > 0
  assert result["params"]["null"] == result["params"]["dense"]


def test_bench_mfu_and_memory_print_their_figures():
  out = cli("bench", "mfu", "--config", "experiments/quickstart.py:smoke", "--rounds", "2")
  assert out.returncode == 0, out.stderr
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["bench"] == "mfu" and r["rows"] * r["seq_len"] == 8 * 128
  for kind in ("null", "dense"):
    assert r[f"{kind}_tokens_per_s"] == pytest.approx(8 * 128 / r[f"{kind}_step_s"])
    assert r[f"{kind}_compile_s"] > 0 and 0 < r[f"{kind}_mfu"] < 1
  out = cli("bench", "memory", "--config", "experiments/quickstart.py:smoke", "--rows", "1,3")
  assert out.returncode == 0, out.stderr
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(r["policies"]) == {"none", "full", "dots"}
  assert all(p["row_bytes"] > 0 and p["fixed_bytes"] > 0 for p in r["policies"].values())


def test_synthetic_rows_are_packed_documents_of_random_sources():
  from sinkformer import bench, config
  cfg = config.load("experiments/quickstart.py:smoke")
  b = bench.synthetic_batch(cfg)
  assert b["tokens"].shape == (cfg.train.batch_size, cfg.data.seq_len)
  for row in range(cfg.train.batch_size):
    segs = b["segment_ids"][row]
    docs = [s for s in np.unique(segs) if s]
    assert 1 <= len(docs) <= cfg.data.max_docs_per_row
    assert all(len(np.unique(b["source_ids"][row][segs == s])) == 1 for s in docs)
    assert (b["loss_mask"][row][segs == 0] == 0).all()


def test_bench_checkpoint_prints_its_figures():
  out = cli("bench", "checkpoint", "--config", "experiments/quickstart.py:smoke", "--rounds", "2")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["bench"] == "checkpoint" and result["bytes"] > 4 * result["params"]
  assert result["save_total_s"] >= result["save_blocking_s"] > 0


def test_data_prepare_info_and_train_on_it(tmp_path):
  words = ["amber", "basil", "cedar", "delta", "ember", "fable", "grove", "haven", "ivory"]
  rng = np.random.default_rng(0)
  with open(tmp_path / "c.jsonl", "w") as f:
    for i in range(40):
      text = f"Item {i}. " + " ".join(rng.choice(words, 50))
      f.write(json.dumps({"key": f"k{i}", "text": text, "group": f"shelf{i % 5}"}) + "\n")
  out = cli("data", "prepare", "--corpus", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "p"),
            "--vocab-size", "300", "--source-by", "group")   # dashed flag names work too
  assert out.returncode == 0, out.stderr
  assert "40 documents" in out.stdout and "5 sources (by group)" in out.stdout
  info = cli("data", "info", "--data", str(tmp_path / "p"))
  assert info.returncode == 0 and info.stdout.splitlines()[0] == out.stdout.splitlines()[-5]
  run = cli("train", "--config", "experiments/quickstart.py:smoke", "--workdir", str(tmp_path / "r"),
            f"--config.data.corpus={tmp_path / 'p'}", "--config.data.val_sources=1",
            "--config.train.steps=3", "--config.train.eval_every=0")
  assert run.returncode == 0, run.stderr
  assert "data: p (" in run.stdout and "1 sources held out" in run.stdout


def test_bench_stream_and_scale_print_their_figures(tmp_path):
  out = cli("bench", "stream", "--config", "experiments/quickstart.py:smoke", "--rounds", "2",
            "--workers", "0,2")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(result["per_thread_count"]) == {"0", "2"} and result["train_tokens_per_s"] > 0
  assert all(r["tokens_per_s"] > 0 for r in result["per_thread_count"].values())
  out = cli("bench", "scale", "--docs", "3000", "--dir", str(tmp_path))
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["documents"] == result["sources"] == 3000
  assert 0 < result["lookup_title_p99_s"] and result["peak_rss_bytes"] > 0
  assert result["late_epoch_first_batch_s"] > 0 and len(result["stream_tokens_per_s"]) == 8
  # a prepared corpus named on the command line, per thread count
  out = cli("bench", "stream", "--data", str(tmp_path / "prepared"), "--workers", "1,2",
            "--rows", "8", "--seq_len", "64")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(result["per_thread_count"]) == {"1", "2"} and "train_tokens_per_s" not in result
  assert "3,000 documents, batches of 8x64" in result["data"]
  out = cli("bench", "stream")
  assert out.returncode == 2 and "--config or --data" in out.stderr


def test_bench_devices_compares_one_device_with_eight():
  env_cli = subprocess.run(
      [sys.executable, "-m", "sinkformer", "bench", "devices", "--config",
       "experiments/quickstart.py:smoke", "--rounds", "2"], capture_output=True, text=True,
      timeout=600, env={**os.environ, "JAX_NUM_CPU_DEVICES": "8"})
  assert env_cli.returncode == 0, env_cli.stderr
  result = json.loads(env_cli.stdout.strip().splitlines()[-1])
  assert result["devices"] == 8 and result["step_s_1"] > 0 and result["step_s_8"] > 0
