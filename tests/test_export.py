"""`sinkformer export`: a NULL in a fixed mode as a Hugging Face LLaMA, checked against
transformers' own LlamaForCausalLM on the same prompts (when torch and transformers are
installed: CI installs them)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sinkformer import config, engine
from sinkformer.errors import UserError
from sinkformer.run import switchboard
from sinkformer.serve import export, serving
from sinkformer.train import trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A NULL with per-layer masks, attention sink heads and backbone rescaling: everything
  that export has to fold."""
  cfg = config.load("experiments/quickstart.py:smoke", (
      "--config.sinks.per_layer=True", "--config.model.num_heads=4",
      "--config.sinks.attn_heads=2", "--config.sinks.attn_k=1",
      "--config.sinks.backbone_rescale=True"))
  cfg.train.update(steps=12, eval_every=0, log_every=6, checkpoint_every=12)
  path = tmp_path_factory.mktemp("run")
  trainer.train(cfg, str(path))
  switchboard.Switchboard(str(path)).unlearn(["person-9"], "so the export must drop its units")
  return str(path)


def ours(run_dir, ids, mode):
  """sinkformer's own logits for one prompt, served as the export's mode is."""
  s = serving.Server(run_dir)
  rows, gate = s.sources_for(["x"], mode)
  t = len(ids)
  batch = {"tokens": np.asarray([ids], np.int32), "positions": np.arange(t)[None],
           "segment_ids": np.ones((1, t), np.int32), "source_ids": np.ones((1, t), np.int32),
           "row_sources": rows}
  return np.asarray(engine.logits_in_mode(s.setup, s.params, batch, gate, s.exclusion()))[0]


@pytest.mark.parametrize("mode", ["backbone", "source:person-3", "source:id:12"])
def test_the_export_is_llama_and_computes_what_sinkformer_computes(run, tmp_path, mode):
  out = tmp_path / "hf"
  record = export.export(run, mode, str(out))
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["intermediate_size"] == max(
      record["units_per_layer"])
  assert record["policy"] == "exclude" and record["ledger_seq"] == 1
  assert record["unlearned_excluded"] == 1
  if mode == "backbone":
    assert record["units_per_layer"] == [32, 32]          # G units only, in every layer
  else:
    assert all(32 < n <= 32 + 8 for n in record["units_per_layer"])   # G + k minus exclusions
  torch = pytest.importorskip("torch", reason="pip install torch transformers to compare "
                                              "the export with transformers (CI does)")
  transformers = pytest.importorskip("transformers")
  tok = transformers.AutoTokenizer.from_pretrained(out)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  ids = tok("Balo Barsk lives_in Doville . Doville river")["input_ids"]
  assert ids[0] == serving.Server(run).tokenizer.bos and len(ids) == 8
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits[0].numpy()
  mine = ours(run, ids, mode)
  assert np.abs(mine - theirs).max() <= 1e-4
  assert np.abs(mine).max() > 1e-2                        # not two models of zeros


def test_an_unlearned_source_or_a_query_dependent_mode_cannot_be_exported(run, tmp_path):
  for ref in ("person-9", "9", "id:9", "key:person-9"):
    with pytest.raises(switchboard.Refused, match="unlearned"):
      export.export(run, f"source:{ref}", str(tmp_path / ref))
  for mode in ("route", "placebo", "mlp-off"):
    with pytest.raises(UserError, match="fixed mode"):
      export.export(run, mode, str(tmp_path / mode))
  assert not any(tmp_path.iterdir())          # nothing half-written
  (tmp_path / "taken").mkdir()
  with pytest.raises(UserError, match="exists"):
    export.export(run, "backbone", str(tmp_path / "taken"))


def test_export_command(run, tmp_path):
  out = subprocess.run([sys.executable, "-m", "sinkformer", "export", "--run", run, "--mode",
                        "source:person-3", "--out", str(tmp_path / "hf")],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "LlamaForCausalLM" in out.stdout and "ledger position 1" in out.stdout
  assert {p.name for p in (tmp_path / "hf").iterdir()} == {
      "config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
      "tokenizer_config.json", "sinkformer.json"}


def test_a_sentencepiece_run_exports_its_tokenizer_for_autotokenizer(tmp_path):
  from sinkformer.data import encyclopedia, prepare
  encyclopedia.write(str(tmp_path / "enc"), 40, 0)
  prepare.prepare(str(tmp_path / "enc" / "corpus.jsonl"), str(tmp_path / "data"), vocab_size=400,
                  log=lambda *_: None)
  cfg = config.load("experiments/quickstart.py:smoke", (
      f"--config.data.corpus={tmp_path / 'data'}", "--config.data.val_sources=4",
      "--config.model.vocab_size=400"))
  cfg.train.update(steps=6, eval_every=0, log_every=6, checkpoint_every=6)
  trainer.train(cfg, str(tmp_path / "run"))
  export.export(str(tmp_path / "run"), "source:person-000002", str(tmp_path / "hf"))
  torch = pytest.importorskip("torch", reason="pip install torch transformers to compare "
                                              "the export with transformers (CI does)")
  transformers = pytest.importorskip("transformers")
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  server = serving.Server(str(tmp_path / "run"))
  text = "Was born in the year 1843, café — naïve!"
  ids = tok(text)["input_ids"]
  assert ids == server.encode(text)
  assert tok.decode(ids, skip_special_tokens=True) == server.tokenizer.decode(ids[1:]) == text
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits[0].numpy()
  assert np.abs(ours(str(tmp_path / "run"), ids, "source:person-000002") - theirs).max() <= 1e-4
