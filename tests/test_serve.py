"""`sinkformer serve`: the HTTP API in every mode, its refusals and bounds, live deletions
(from this server and from another process), and a load test against real processes."""

import json
import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from sinkformer.bench import load
from sinkformer.serve import http

TOKEN = "a-test-token-of-some-length"


@pytest.fixture
def run(fresh_run):
  return fresh_run


def client(run, token=TOKEN, **limits):
  return TestClient(http.create_app(run, token, http.Limits(**{"window_s": 0.001, **limits})))


def source_of(choice) -> int:
  return int(re.search(r"\(id (\d+)\)$", choice["source"]).group(1))


def complete(c, **body):
  return c.post("/v1/completions", json={"max_tokens": 6, **body})


def test_completions_in_every_mode_name_the_mode_source_and_policy(run):
  with client(run) as c:
    for mode in ("route", "source:person-5", "source:id:5", "backbone", "placebo"):
      r = complete(c, prompt=["Balo Barsk", "Silo Rirsk lives_in"], mode=mode)
      assert r.status_code == 200, r.text
      body = r.json()
      assert [ch["index"] for ch in body["choices"]] == [0, 1] and body["policy"] == "exclude"
      for ch in body["choices"]:
        assert ch["mode"] == mode and ch["policy"] == "exclude" and 0 < ch["tokens"] <= 6
        assert (ch["source"] is None) == (mode == "backbone")
      if mode.startswith("source:"):
        assert {source_of(ch) for ch in body["choices"]} == {5}
    # Same seed, same text; greedy equals the CLI's sampler.
    a = complete(c, prompt="Balo Barsk", mode="source:person-5", temperature=0.9, seed=3).json()
    b = complete(c, prompt="Balo Barsk", mode="source:person-5", temperature=0.9, seed=3).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_streaming_sends_chunks_then_the_sources_then_done(run):
  with client(run) as c:
    whole = complete(c, prompt="Balo Barsk", mode="source:person-5", max_tokens=40).json()
    with c.stream("POST", "/v1/completions", json={"prompt": "Balo Barsk", "max_tokens": 40,
                                                   "mode": "source:person-5", "stream": True}) as r:
      events = [l[len("data: "):] for l in r.iter_lines() if l.startswith("data: ")]
  assert events[-1] == "[DONE]"
  parts = [json.loads(e) for e in events[:-1]]
  text = "".join(ch.get("text", "") for p in parts for ch in p["choices"])
  assert text == whole["choices"][0]["text"]
  assert parts[-1]["choices"][0]["source"].endswith("(id 5)")


def test_bad_requests_get_4xx_naming_the_field(run):
  with client(run, max_prompts=2, max_tokens=8, max_prompt_tokens=4) as c:
    r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = complete(c, prompt="Balo Barsk", max_tokenz=3)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_tokenz"]
    r = complete(c, prompt="Balo Barsk", temperature=-1)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "temperature"]
    assert "max_tokens: at most 8" in complete(c, prompt="Balo", max_tokens=9).json()["detail"]
    assert "at most 4 tokens" in complete(c, prompt="Balo Barsk Balo Barsk Balo").json()["detail"]
    assert "1 to 2 prompts" in complete(c, prompt=["Balo"] * 3).json()["detail"]
    r = complete(c, prompt="Balo", mode="source:x' OR 1=1 --")
    assert r.status_code == 400 and "unknown source" in r.json()["detail"]
    assert complete(c, prompt="Balo", mode="sideways").status_code == 400
    assert complete(c, prompt="Balo", mode="source:silo rirsk").status_code == 409   # two match
    assert c.get("/v1/sources", params={"limit": 5000}).status_code == 422


def test_unlearning_needs_the_token_and_takes_effect_for_the_next_request(run):
  with client(run) as c:
    change = {"sources": ["person-5"], "reason": "erasure request 7"}
    assert c.post("/v1/unlearn", json=change).status_code == 401
    assert c.post("/v1/unlearn", json=change,
                  headers={"Authorization": "Bearer wrong-token-wrong"}).status_code == 401
    r = c.post("/v1/unlearn", json=change, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["changed"] == [5] and r.json()["ledger_seq"] == 1
    for ref in ("person-5", "5", "id:5", "key:person-5", "KILO  SERSK", "title:kilo sersk"):
      r = complete(c, prompt="Balo", mode=f"source:{ref}")
      assert r.status_code == 403 and "unlearned" in r.json()["detail"], ref
    for _ in range(3):
      routed = complete(c, prompt=["Kilo Sersk"] * 4, mode="route").json()["choices"]
      assert 5 not in {source_of(ch) for ch in routed}
    shown = c.get("/v1/sources/person-5").json()["sources"][0]
    assert shown["status"] == "unlearned" and shown["ledger"][0]["why"] == "erasure request 7"
    assert c.get("/v1/sources", params={"status": "unlearned"}).json()["counts"]["unlearned"] == 1
    r = c.post("/v1/reactivate", json=change, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 403 and "allow_reactivation" in r.json()["detail"]
    assert c.get("/healthz").json()["ledger_seq"] == 1
    # Another process unlearns through the CLI: the server's next request honours it.
    out = subprocess.run([sys.executable, "-m", "sinkformer", "unlearn", "--run", run,
                          "--reason", "from another process", "person-6"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert complete(c, prompt="Balo", mode="source:person-6").status_code == 403


def test_without_a_token_unlearning_over_http_is_off(run):
  with client(run, token=None) as c:
    r = c.post("/v1/unlearn", json={"sources": ["person-5"], "reason": "x"},
               headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and "--token-file" in r.json()["detail"]
    assert complete(c, prompt="Balo", mode="source:person-5").status_code == 200


@pytest.mark.slow
def test_load_real_server_sends_nothing_from_a_source_after_its_unlearn_returned(fresh_run):
  got = load.run(fresh_run, clients=12, duration_s=8, http_unlearns=1, cli_unlearns=1,
                 max_tokens=8, max_batch=8, log=lambda *_: None)
  assert got["tokens_after_unlearn"] == 0 and got["lost_ledger_entries"] == 0
  assert got["server_errors"] == 0 and got["ok"] > 0
  assert [u["status"] for u in got["unlearns"]] == [200, 200] and got["confirm_max_s"] < 30
  assert got["ok"] + got["refused"] + got["busy"] == got["requests"]


def test_attribution_credits_the_source_whose_sinks_learned_the_text(run, tmp_path):
  from sinkformer.eval import attribution
  from sinkformer.serve import serving
  server = serving.Server(run)
  row = server.board.catalog.get("person-7")
  # the run's own article about person 7: its sinks explain it best
  from sinkformer.data import pipeline
  from sinkformer.run import directory
  data = pipeline.load(directory.trained_config(run)[0])
  doc = serving.source_openings(data, [row["id"]])[0]
  text = server.tokenizer.decode(doc)
  got = attribution.attribute(server, text, top=5)
  assert got["ranked"][0]["id"] == row["id"] and got["candidates"] == len(server.router.ids)
  assert got["ranked"][0]["gain"] > got["ranked"][1]["gain"] > got["ranked"][4]["gain"]
  first = got["ranked"][0]
  assert first["nll"] == pytest.approx(got["backbone_nll"] - first["gain"])
  out = subprocess.run([sys.executable, "-m", "sinkformer", "attribute", "--run", run,
                        "--text", text, "--top", "3", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "(id 7, person-7)" in out.stdout.splitlines()[2]     # rank 1
  assert (tmp_path / "attribution.png").stat().st_size > 0
  assert json.loads((tmp_path / "attribution.json").read_text())["ranked"][0]["id"] == 7
  # unlearned sources are never credited
  server.board.unlearn(["person-7"], "test")
  server.refresh()
  again = attribution.attribute(server, text, top=5)
  assert row["id"] not in [r["id"] for r in again["ranked"]]
  assert again["candidates"] == got["candidates"] - 1
