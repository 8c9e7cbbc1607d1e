"""Corpora, prepared data and run directories in a bucket: a real GCS JSON API (the
gcp-storage-emulator server, in memory) spoken to by the same clients as on Google Cloud
(gcsfs through etils.epath, and TensorStore under Orbax)."""

import json
import os
import socket
import subprocess
import sys

import gcsfs
import pytest
from etils import epath
from etils.epath import backend

from sinkformer import storage
from sinkformer.data import pipeline, prepare
from sinkformer.errors import UserError
from sinkformer.run import switchboard
from sinkformer.train import trainer


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _point_clients_at(url: str):
  os.environ["STORAGE_EMULATOR_HOST"] = url
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
  os.environ["TENSORSTORE_GCS_REQUEST_CONCURRENCY"] = "1"   # the emulator's store has no locks
  os.environ["NO_GCE_CHECK"] = "true"
  backend.fsspec_backend._get_filesystem.cache_clear()   # clients made for another server
  gcsfs.GCSFileSystem.clear_instance_cache()
  storage._checked.clear()


def _send_generations():
  """The emulator leaves out the x-goog-generation header of downloads, which TensorStore
  reads (OCDBT's manifest updates are conditional on it): add it, as GCS sends it."""
  from http import HTTPStatus

  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  plain = getattr(objects.download, "plain", objects.download)

  def download(request, response, storage, *args, **kwargs):
    plain(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])

  download.plain = plain
  objects.download = download   # objects.get(alt=media) looks it up at call time
  for _, methods in server.HANDLERS:
    for method, handler in methods.items():
      if handler is plain:
        methods[method] = download


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  from gcp_storage_emulator.server import create_server
  _send_generations()
  port = _free_port()
  server = create_server("localhost", port, in_memory=True, default_bucket="bkt")
  server.start()
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                          "TENSORSTORE_GCS_REQUEST_CONCURRENCY", "NO_GCE_CHECK",
                                          "SINKFORMER_CACHE")}
  _point_clients_at(f"http://localhost:{port}")
  os.environ["SINKFORMER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
  yield "gs://bkt"
  server.stop()
  for k, v in saved.items():
    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
  backend.fsspec_backend._get_filesystem.cache_clear()
  gcsfs.GCSFileSystem.clear_instance_cache()


def _corpus(n=60) -> str:
  words = ["river", "stone", "harbour", "lantern", "orchard", "bridge", "market", "tower"]
  return "".join(json.dumps({"key": f"e{i}", "title": f"Entity {i}",
                             "text": f"Entity {i} keeps a {words[i % 8]} near the "
                                     f"{words[(3 * i) % 8]}. It was founded in {1700 + i}."})
                 + "\n" for i in range(n))


def _new_host(tmp_path, name):
  """Another machine: its own empty cache, nothing shared with this one but the bucket."""
  os.environ["SINKFORMER_CACHE"] = str(tmp_path / name)


def test_prepare_train_resume_and_unlearn_in_a_bucket(bucket, smoke_cfg, tmp_path, capsys):
  (epath.Path(bucket) / "corpus.jsonl").write_text(_corpus())
  m = prepare.prepare(f"{bucket}/corpus.jsonl", f"{bucket}/prepared", vocab_size=320,
                      workers=1, log=lambda _: 0)
  remote = epath.Path(f"{bucket}/prepared")
  assert {f.name for f in remote.iterdir()} >= {"manifest.json", "catalog.sqlite",
                                                 "tokenizer.model", "documents.npz", *m["shards"]}
  with pytest.raises(UserError, match="already prepared"):
    prepare.prepare(f"{bucket}/corpus.jsonl", f"{bucket}/prepared", log=lambda _: 0)
  from sinkformer import cli
  capsys.readouterr()
  assert cli.run(["data", "info", "--data", f"{bucket}/prepared"]) == 0
  assert f"ArrayRecord ({len(m['shards'])} shards of up to 60 documents" in capsys.readouterr().out

  # A host that never saw the prepare reads it from the bucket: the same records.
  _new_host(tmp_path, "host-a")
  docs = pipeline.open_prepared(f"{bucket}/prepared")
  assert docs.origin == f"{bucket}/prepared" and len(docs.lengths) == m["documents"]
  (tmp_path / "c.jsonl").write_text(_corpus())
  local = prepare.prepare(str(tmp_path / "c.jsonl"), str(tmp_path / "local"), vocab_size=320,
                          workers=1, log=lambda _: 0)
  assert local["corpus"]["sha256"] == m["corpus"]["sha256"]

  cfg = smoke_cfg
  cfg.data.corpus, cfg.data.val_sources = f"{bucket}/prepared", 8
  steps = cfg.train.steps
  cfg.train.checkpoint_every = steps // 2
  cfg.train.steps = steps // 2
  trainer.train(cfg, f"{bucket}/run")
  run = epath.Path(f"{bucket}/run")
  assert (run / "checkpoints" / str(steps // 2)).is_dir()
  assert (run / "metrics.jsonl").exists() and (run / switchboard.FILE).exists()

  # Another host resumes from the bucket's checkpoint; the metrics continue in the bucket.
  _new_host(tmp_path, "host-b")
  cfg.train.steps = steps
  _, history = trainer.train(cfg, f"{bucket}/run")
  assert history[0]["step"] > steps // 2
  logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert {r["step"] for r in logged if r["split"] == "train"} >= {steps // 2, steps}

  # The CLI on the bucket's run: an unlearning lands in the bucket's switchboard.
  _new_host(tmp_path, "host-c")
  assert cli.run(["unlearn", "--run", f"{bucket}/run", "--reason", "test",
                  "key:e3"]) == 0
  _new_host(tmp_path, "host-d")
  board = switchboard.Switchboard(storage.pull(f"{bucket}/run"))
  assert [r["key"] for r in board.resolve(["key:e3"]) if r["status"] == "unlearned"] == ["e3"]
  board.close()


def test_a_mirror_never_overwrites_what_another_host_pushed(bucket, tmp_path):
  uri = f"{bucket}/shared-run"
  (epath.Path(uri) / "notes.txt").write_text("v0")
  _new_host(tmp_path, "one")
  first = storage.pull(uri)
  _new_host(tmp_path, "two")
  second = storage.pull(uri)
  (epath.Path(first) / "notes.txt").write_text("from one")
  storage.push(first)
  (epath.Path(second) / "notes.txt").write_text("from two")
  with pytest.raises(UserError, match="changed in the bucket"):
    storage.push(second)
  assert (epath.Path(uri) / "notes.txt").read_text() == "from one"


def test_an_unreachable_bucket_fails_in_seconds_with_one_line(tmp_path):
  env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://localhost:{_free_port()}",
         "NO_GCE_CHECK": "true", "SINKFORMER_CACHE": str(tmp_path / "cache")}
  corpus = tmp_path / "c.jsonl"
  corpus.write_text(_corpus(5))
  for argv in (["data", "prepare", "--corpus", str(corpus), "--out", "gs://nowhere/x"],
               ["data", "prepare", "--corpus", "gs://nowhere/c.jsonl", "--out",
                str(tmp_path / "out")],
               ["sources", "list", "--run", "gs://nowhere/run"]):
    # the probe gives up after storage.PROBE_SECONDS; retrying clients would take minutes
    done = subprocess.run([sys.executable, "-m", "sinkformer", *argv], env=env,
                          capture_output=True, text=True, timeout=90)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "gs://nowhere" in lines[0], done.stderr
