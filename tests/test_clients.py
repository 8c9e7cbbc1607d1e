"""`sinkformer serve` as the ecosystem's clients meet it: the real `openai` client, and
lm-evaluation-harness's `local-completions` scoring a served run (a real server process)."""

import json
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest

from sinkformer.bench import load
from sinkformer.serve import serving

openai = pytest.importorskip("openai", reason="pip install openai==3.63.0 (requirements.txt)")
TOKEN = "a-test-token-of-some-length"


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
  """A server of a copy of the trained run (named 'run'), for the whole module."""
  run = tmp_path_factory.mktemp("served") / "run"
  shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("servers"))
  with load.running_server(str(run), TOKEN, 4) as (url, _):
    yield str(run), url


def test_the_openai_client_completes_streams_and_lists_models(served):
  run, url = served
  client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
  names = [m.id for m in client.models.list().data]
  assert names == ["run", "run@route", "run@backbone", "run@placebo"]
  got = client.completions.create(model="run@backbone", prompt="Balo Barsk lives_in",
                                  max_tokens=8)
  choice = got.choices[0]
  assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
  assert got.usage.prompt_tokens == 3 and 0 < got.usage.completion_tokens <= 8
  assert choice.finish_reason in ("stop", "length") and choice.model_extra["source"] is None
  chunks = list(client.completions.create(model="run@backbone", prompt="Balo Barsk lives_in",
                                          max_tokens=8, stream=True))
  assert all(isinstance(c.choices[0].text, str) for c in chunks)   # the last one too: ""
  assert "".join(c.choices[0].text for c in chunks) == choice.text
  assert chunks[-1].choices[0].finish_reason == choice.finish_reason
  routed = client.completions.create(model="run", prompt="Balo Barsk", max_tokens=2)
  assert routed.choices[0].model_extra["mode"] == "route"
  with pytest.raises(openai.NotFoundError, match="not served here"):
    client.completions.create(model="gpt-4o", prompt="Balo", max_tokens=2)
  with pytest.raises(openai.BadRequestError, match="prompt: empty"):
    client.completions.create(model="run", prompt="", max_tokens=2)
  with pytest.raises(openai.BadRequestError, match="context is 128"):
    client.completions.create(model="run", prompt=[5] * 200, max_tokens=2)


def test_echo_and_logprobs_equal_the_models_own_scores(served):
  """What lm-eval reads: the prompt's token log-probabilities, echoed, equal sinkformer's own
  scoring of the same text in the same mode."""
  run, url = served
  prompt, answer = "Balo Barsk lives_in", "Doville ."
  r = httpx.post(f"{url}/v1/completions", timeout=120, json={
      "model": "run@source:key:person-3", "prompt": f"{prompt} {answer}", "max_tokens": 0,
      "echo": True, "logprobs": 2})
  assert r.status_code == 200, r.text
  lp = r.json()["choices"][0]["logprobs"]
  assert lp["tokens"] == (prompt + " " + answer).split()
  assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
  server = serving.Server(run)
  want = server.score([prompt], [answer], "source:key:person-3")[0]
  assert sum(lp["token_logprobs"][3:]) == pytest.approx(want, rel=1e-4, abs=1e-4)
  for top, mine in zip(lp["top_logprobs"], lp["token_logprobs"]):
    assert len(top) == 2 and max(top.values()) >= mine - 1e-5
  assert lp["text_offset"][:2] == [0, len("Balo ")]
  # the same with the prompt as token ids (what lm-eval sends), and with a generated token
  ids = httpx.post(f"{url}/tokenize", json={"prompt": f"{prompt} {answer}",
                                            "add_special_tokens": False}).json()["tokens"]
  r = httpx.post(f"{url}/v1/completions", timeout=120, json={
      "model": "run@source:key:person-3", "prompt": ids, "max_tokens": 1, "echo": True,
      "logprobs": 1, "temperature": 0})
  again = r.json()["choices"][0]["logprobs"]
  assert again["token_logprobs"][:5] == pytest.approx(lp["token_logprobs"], abs=1e-5)
  assert len(again["token_logprobs"]) == 6   # the prompt's five and the generated one


def test_stop_sequences_and_the_tokenizer_endpoints(served):
  run, url = served
  free = httpx.post(f"{url}/v1/completions", timeout=120, json={
      "model": "run@backbone", "prompt": "Balo Barsk lives_in", "max_tokens": 12}).json()
  text = free["choices"][0]["text"]
  word = text.split()[1] if len(text.split()) > 1 else None
  if word:   # stop at the second word: the text ends right before it
    cut = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "run@backbone", "prompt": "Balo Barsk lives_in", "max_tokens": 12,
        "stop": [word]}).json()["choices"][0]
    assert cut["text"] == text[:text.find(word)] and cut["finish_reason"] == "stop"
  info = httpx.get(f"{url}/tokenizer_info").json()
  assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == ("<s>", "</s>", 128)
  eos = httpx.post(f"{url}/tokenize", json={"prompt": "</s>", "add_special_tokens": False})
  assert eos.json()["tokens"] == [2]   # the special token, not its characters
  tokens = httpx.post(f"{url}/tokenize", json={"prompt": "Balo Barsk"}).json()["tokens"]
  assert tokens[0] == 1 and len(tokens) == 3   # BOS added unless asked not to
  assert httpx.post(f"{url}/detokenize", json={"tokens": tokens}).json()["prompt"] == "Balo Barsk"
  assert httpx.post(f"{url}/detokenize", json={"tokens": [10**6]}).status_code == 400


@pytest.mark.slow
def test_lm_eval_scores_a_served_null_as_sinkformer_does(served, tmp_path):
  """lm-evaluation-harness (local-completions, the server's own tokenizer) runs a task whose
  data ships with the tests; its accuracy equals sinkformer's own scoring of the choices."""
  pytest.importorskip("lm_eval", reason="pip install lm-eval==0.4.13 (requirements.txt)")
  run, url = served
  env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
         "TOKENIZERS_PARALLELISM": "false"}
  out = subprocess.run(
      [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
       f"model=run@backbone,base_url={url}/v1/completions,tokenizer_backend=remote,"
       "num_concurrent=1,max_retries=1,max_length=128", "--tasks", "sinkformer_tiny",
       "--include_path", "tests/data/lm_eval", "--output_path", str(tmp_path)],
      capture_output=True, text=True, timeout=900, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(open(next(os.path.join(d, f) for d, _, fs in os.walk(tmp_path)
                                for f in fs if f.startswith("results"))).read())
  acc = result["results"]["sinkformer_tiny"]["acc,none"]
  server = serving.Server(run)
  items = [json.loads(x) for x in open("tests/data/lm_eval/tiny.jsonl")]
  right = 0
  for item in items:   # lm-eval's convention: the choice after a space, summed log p
    scores = server.score([item["question"]] * 4, item["choices"], "backbone")
    right += int(np.argmax(scores) == item["answer"])
  assert acc == pytest.approx(right / len(items))
