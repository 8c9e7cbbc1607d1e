"""The `sinkformer` command as a user meets it: help, one-line errors, a real run, the bench."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest


def cli(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "sinkformer", *args], capture_output=True,
                        text=True, timeout=timeout)


def test_every_benchmark_is_one_registry_entry_and_one_command():
  from sinkformer import bench
  from sinkformer.cli import COMMANDS
  assert {f"bench {name}" for name in bench.REGISTRY} == {c for c in COMMANDS if c.startswith("bench ")}
  for name in bench.REGISTRY:
    assert callable(bench.get(name))
  assert all(f"`{name}`" in bench.__doc__ for name in bench.REGISTRY)


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
      "--config.model.d_modle=3"), "unknown config field 'model.d_modle'; nearest: model.d_model"),
    (("train", "--config=experiments/quickstart.py", "--workdir", "x", "--config.trian.steps=3"),
     "nearest: train.steps"),
    (("train", "--config", "experiments/quickstart.py", "--workdir", "x",
      "--config.train.steps=5"), "--config.train.warmup_steps=1"),
    (("train", "--config", "experiments/quickstart.py", "--workdir", "README.md"),
     "--workdir README.md is a file"),
    (("sources", "list", "--run", "/nonexistent/run"), "--run /nonexistent/run does not exist"),
    (("config", "show"), "--config is required"),
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
  from sinkformer import config
  from sinkformer.bench import steps
  cfg = config.load("experiments/quickstart.py:smoke")
  b = steps.synthetic_batch(cfg)
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
  assert re.search(r"^prepared in [0-9.]+ s \([0-9,]+ documents/s\)$", out.stdout, re.M)
  info = cli("data", "info", "--data", str(tmp_path / "p"))
  assert info.returncode == 0 and info.stdout.splitlines()[0] in out.stdout.splitlines()
  assert f"next: sinkformer train --config experiments/quickstart.py --workdir runs/NAME " \
      f"--config.data.corpus={tmp_path / 'p'}" in out.stdout
  run = cli("train", "--config", "experiments/quickstart.py:smoke", "--workdir", str(tmp_path / "r"),
            f"--config.data.corpus={tmp_path / 'p'}", "--config.data.val_sources=1",
            "--config.train.steps=3", "--config.train.eval_every=0")
  assert run.returncode == 0, run.stderr
  assert "data: p (" in run.stdout and "1 sources held out" in run.stdout
  common = ("train", "--config", "experiments/quickstart.py:smoke", "--workdir",
            str(tmp_path / "r2"), f"--config.data.corpus={tmp_path / 'p'}")
  most = cli(*common, "--config.data.val_sources=4")   # 4 of 5 books held out: refused
  assert most.returncode == 2 and "set it to at most 2 (half)" in most.stderr, most.stderr
  small = cli(*common, "--config.data.val_sources=1", "--config.model.vocab_size=256")
  assert small.returncode == 2 and "--config.model.vocab_size=300" in small.stderr
  assert "again with --vocab-size=256" in small.stderr


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


def test_help_is_grouped_hyphenated_and_free_of_absl_boilerplate():
  out = cli("generate", "--help")
  assert out.returncode == 0
  text = out.stdout
  assert text.startswith("usage: sinkformer generate --run DIR --prompt TEXT")
  assert text.index("required:") < text.index("  --run DIR") < text.index("options:")
  assert "--max-tokens N" in text and "--max_tokens" not in text
  for noise in ("flagfile", "undefok", "sinkformer.cli", "absl"):
    assert noise not in text


def test_config_show_lists_presets_and_every_resolved_field():
  from sinkformer import config
  out = cli("config", "show", "--config", "experiments/quickstart.py:smoke",
            "--config.train.lr=0.01")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert any(l.startswith("#   smoke: model.d_model=64") for l in lines)
  shown = {l[2:].split(" = ")[0].strip(): l for l in lines if " = " in l and not l.startswith("#")}
  assert set(shown) == set(config.fields(config.load("experiments/quickstart.py:smoke")))
  assert shown["train.lr"].startswith("*") and "(base: 0.002)" in shown["train.lr"]
  assert shown["model.d_model"].startswith("*") and shown["seed"].startswith(" ")


@pytest.mark.parametrize("content,needle", [
    (b"", "has no documents with text"),
    (b"\n  \n" + b'{"key": "a", "text": "   "}\n', "has no documents with text"),
    (b"\x1f\x8b\x08\x00" + bytes(range(256)), "is not text (it holds NUL bytes)"),
])
def test_prepare_refuses_empty_and_binary_corpora_clearly(content, needle, tmp_path):
  (tmp_path / "c.jsonl").write_bytes(content)
  out = cli("data", "prepare", "--corpus", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "p"))
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert needle in out.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


def test_run_commands_refuse_what_cannot_work_and_say_the_fix(trained_run, tmp_path):
  import shutil
  run = tmp_path / "run"
  shutil.copytree(trained_run, run)
  capacity = cli("sources", "capacity", "--run", str(run), "--sample", "5000")
  assert capacity.returncode == 0, capacity.stderr
  rows = [l.split() for l in capacity.stdout.splitlines()[1:]]
  assert rows and all(int(r[0].replace(",", "")) >= 0 for r in rows)
  assert all(0 <= float(x) <= 1 for r in rows for x in r[1:5])
  assert "40 retained sources measured" in capacity.stdout   # half of the 80 active ones
  for prompt, needle in (("", "give a prompt with text"),
                         ("Balo Barsk " * 100, "does not fit: the model's context is 128")):
    out = cli("generate", "--run", str(run), "--prompt", prompt)
    assert out.returncode == 2 and needle in out.stderr, out.stderr
  assert cli("unlearn", "--run", str(run), "--reason", "test", "person-7").returncode == 0
  out = cli("export", "--run", str(run), "--mode", "source:person-7", "--out", str(tmp_path / "hf"))
  assert out.returncode == 2 and "it cannot be exported" in out.stderr, out.stderr


def test_train_reports_its_compile_time_and_what_to_run_next(tmp_path):
  out = cli("train", "--config", "experiments/quickstart.py:smoke", "--workdir", str(tmp_path),
            "--config.train.steps=2", "--config.train.warmup_steps=0",
            "--config.train.eval_every=0")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert "compiling the train step ..." in lines
  compiled = [l for l in lines if l.startswith("compiled in ")]
  assert compiled and lines.index(compiled[0]) < next(i for i, l in enumerate(lines)
                                                      if l.startswith("step "))
  assert "and 16 held out for evaluation (ids 65-80)" in out.stdout
  assert lines[-2].startswith("done: 2 steps, loss ") and str(tmp_path) in lines[-2]
  assert lines[-1] == (f"next: sinkformer generate --run {tmp_path} --prompt TEXT | sinkformer "
                       f"serve --run {tmp_path} | sinkformer unlearn --run {tmp_path} --reason "
                       "WHY SOURCE")
