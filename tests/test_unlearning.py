"""Unlearning: the switchboard, the in-graph exclusion, the router, generation, and every
path a user could take to reach an unlearned source."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sinkformer.data import catalog
from sinkformer.errors import UserError
from sinkformer.model import sinks, transformer
from sinkformer.run import switchboard
from sinkformer.serve import generate, serving


def board_of(tmp_path, n=30, groups=3):
  rows = [(i, f"k{i}", f"Title {i}", f"shelf{i % groups}", 1, 10) for i in range(1, n + 1)]
  switchboard.create(str(tmp_path), None, rows)
  return switchboard.Switchboard(str(tmp_path))


def test_unlearn_by_any_name_is_idempotent_and_ledgered(tmp_path):
  b = board_of(tmp_path)
  got = b.unlearn(["k1", "  title   2 ", "3", "group:SHELF1"], "user request", who="dpo")
  shelf1 = {i for i in range(1, 31) if i % 3 == 1}
  assert set(got["changed"]) == {1, 2, 3} | shelf1 and got["request_id"]
  again = b.unlearn(["k1"], "again")
  assert again["changed"] == [] and again["unchanged"] == [1] and again["request_id"] is None
  ledger = b.ledger()
  assert len(ledger) == len(got["changed"]) and {e["who"] for e in ledger} == {"dpo"}
  with pytest.raises(sqlite3.DatabaseError, match="append-only"):
    b.db.execute("UPDATE ledger SET why = 'nothing happened'")
  with pytest.raises(sqlite3.DatabaseError, match="append-only"):
    b.db.execute("DELETE FROM ledger")


def test_a_request_with_an_unknown_source_changes_nothing(tmp_path):
  b = board_of(tmp_path)
  with pytest.raises(UserError, match="'nobody'"):
    b.unlearn(["k1", "k2", "nobody"], "x")
  assert b.unlearned_ids() == [] and b.ledger() == []


def test_reactivation_is_off_unless_allowed_and_ledgered(tmp_path):
  b = board_of(tmp_path)
  b.unlearn(["k5"], "x")
  with pytest.raises(switchboard.Refused, match="allow_reactivation"):
    b.reactivate(["k5"], "oops")
  assert b.unlearned_ids() == [5]
  b.reactivate(["k5"], "court order reversed", allowed=True)
  assert b.unlearned_ids() == [] and [e["action"] for e in b.ledger(5)] == ["unlearn", "reactivate"]


def test_refusals_by_every_name(tmp_path):
  b = board_of(tmp_path)
  b.unlearn(["k7", "group:shelf2"], "x")
  for ref in ("k7", "7", "id:7", "key:k7", "title 7", "TITLE  7", "title:Title 8", "Title 8",
              "group:SHELF2"):
    with pytest.raises(switchboard.Refused, match="unlearned"):
      b.active(ref)
  assert b.active("k1")["id"] == 1


def test_a_reference_that_can_mean_several_sources_is_refused_listing_them(tmp_path):
  rows = [(1, "0", "0", None, 1, 10), (2, "1", "1", None, 1, 10),            # wiki-vital: "0", "1"
          (3, "a", "Silo Rirsk", None, 1, 10), (4, "b", "silo  RIRSK", None, 1, 10),
          (5, "c", "Emma", "Emma", 1, 10), (6, "d", "Emma, chapter 2", "Emma", 1, 10)]
  switchboard.create(str(tmp_path), None, rows)
  b = switchboard.Switchboard(str(tmp_path))
  for ref, ids in (("1", {1, 2}), ("Silo Rirsk", {3, 4}), ("emma", {5, 6})):
    with pytest.raises(catalog.Ambiguous) as e:
      b.unlearn(["key:0", ref], "x")
    assert {r["id"] for r in e.value.candidates} == ids
    assert all(f"id:{i} " in str(e.value) for i in ids) and "--all-matching" in str(e.value)
    with pytest.raises(catalog.Ambiguous):
      b.active(ref)
  assert b.unlearned_ids() == [] and b.ledger() == []     # nothing of a refused request lands
  assert b.unlearn(["id:1"], "x")["changed"] == [1]
  assert b.unlearn(["title:1"], "x")["changed"] == [2]
  assert b.unlearn(["title:silo rirsk"], "x", all_matching=True)["changed"] == [3, 4]
  with pytest.raises(UserError, match="names 2 sources; a mode serves one"):
    b.active("group:emma")
  assert b.unlearn(["title:Emma"], "x")["changed"] == [5]
  assert b.unlearn(["group:EMMA"], "x")["changed"] == [6]   # a group is all of its sources
  with pytest.raises(UserError, match="an id is a number"):
    b.resolve(["id:one"])
  with pytest.raises(UserError, match="unknown source.*'key:Emma'"):
    b.resolve(["key:Emma"])


def test_search_matches_its_text_literally(tmp_path):
  rows = [(1, "a", "100% cotton", None, 1, 1), (2, "b", "1000 cotton", None, 1, 1),
          (3, "c", "snake_case", None, 1, 1), (4, "d", "snakeXcase", None, 1, 1)]
  switchboard.create(str(tmp_path), None, rows)
  b = switchboard.Switchboard(str(tmp_path))
  assert [r["id"] for r in b.search("0% c")] == [1]
  assert [r["id"] for r in b.search("e_c")] == [3]


CRASH = """
import sys
from sinkformer.run import switchboard
b = switchboard.Switchboard(sys.argv[1])
ids = [r["id"] for r in b.page("active", 0, 10**9)]
for start in range(0, len(ids), 10000):
  print("begin", flush=True)
  b.unlearn([f"id:{i}" for i in ids[start:start + 10000]], "batch")
  print("committed", flush=True)
"""


@pytest.mark.slow
def test_a_batch_lands_whole_or_not_at_all_when_the_process_is_killed(tmp_path):
  board_of(tmp_path, n=400_000).close()
  script = tmp_path / "crash.py"
  script.write_text(CRASH)
  rng = np.random.default_rng(0)
  mid_request = 0
  for attempt in range(5):
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    while proc.stdout.readline().strip() != "committed":   # let one request land first
      pass
    time.sleep(rng.uniform(0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    mid_request += proc.stdout.read().split()[-1:] == ["begin"]   # killed inside a request
    b = switchboard.Switchboard(str(tmp_path))
    per_request = b.db.execute("SELECT request_id, count(*) FROM ledger GROUP BY request_id").fetchall()
    assert all(n == 10_000 for _, n in per_request), per_request
    assert len(b.unlearned_ids()) == 10_000 * len(per_request) and len(per_request) > attempt
    b.close()
  assert mid_request >= 1   # the kills did land inside requests


def test_exclusion_is_an_argument_and_equals_deleting_the_units(fresh_run):
  server = serving.Server(fresh_run)
  prompts = [server.encode(server.board.catalog.get(i)["title"]) for i in (10, 11)]
  s = generate.Sampling(max_new=6)
  before = generate.sample(server.setup, server.params, prompts, [10, 11], server.exclusion(), s)
  compiled = lambda: (generate._prefill._cache_size(), generate._decode_chunk._cache_size())
  before_compiles = compiled()
  server.board.unlearn(["person-1", "person-2", "person-3"], "test")
  server.refresh()
  ex = server.exclusion()
  expected = np.asarray(sinks.exclusion(server.setup.spec, [1, 2, 3]).mlp)
  np.testing.assert_array_equal(ex.mlp, expected)
  generate.sample(server.setup, server.params, prompts, [10, 11], ex, s)
  assert compiled() == before_compiles          # no recompilation
  assert before is not None

  # With `exclude`, serving equals a model whose excluded sink units were deleted.
  G = server.setup.dims.mlp_backbone
  gone = np.concatenate([np.zeros(G, bool), expected[0]])
  deleted = jax.tree_util.tree_map_with_path(
      lambda path, x: x.at[:, gone].set(0) if "down" in jax.tree_util.keystr(path) else x,
      server.params)
  rows = {"tokens": jnp.asarray([prompts[0]]), "positions": jnp.arange(len(prompts[0]))[None],
          "segment_ids": jnp.ones((1, len(prompts[0])), jnp.int32)}
  gate = lambda ex: sinks.make_gate(server.setup.spec, "source", segment_ids=rows["segment_ids"],
                                    row_sources=jnp.asarray([10]), exclude=ex, max_docs=1)
  served = transformer.apply(server.setup.graphdef, server.params, rows, gate(ex))
  hard = transformer.apply(server.setup.graphdef, deleted, rows, gate(None))
  np.testing.assert_allclose(served, hard, atol=1e-5)
  assert np.abs(served - transformer.apply(server.setup.graphdef, server.params, rows, gate(None))).max() > 0


def test_every_mode_and_no_path_to_an_unlearned_source(fresh_run):
  server = serving.Server(fresh_run)
  title = server.board.catalog.get(5)["title"]
  for mode in ("route", "source:person-5", "backbone", "placebo"):
    out = server.generate([title, title + " lives_in"], mode, generate.Sampling(max_new=4))
    assert len(out) == 2 and out[0]["mode"] == mode and out[0]["policy"] == "exclude"
  routed = server.generate([title], "route")[0]["source"]
  routed_id = int(routed.split("id ")[1].rstrip(")"))
  server.board.unlearn([str(routed_id), "person-5"], "test")
  for ref in ("person-5", "5", title.upper(), f"  {title}  ", str(routed_id)):
    with pytest.raises(switchboard.Refused):
      server.generate([title], f"source:{ref}")
    with pytest.raises(switchboard.Refused):
      server.score([title], ["lives_in"], f"source:{ref}")
  unlearned = set(server.board.unlearned_ids())
  for mode in ("route", "placebo"):
    again = server.generate([title, "Balo Barsk"], mode)
    assert all(int(o["source"].split("id ")[1].rstrip(")")) not in unlearned for o in again)


def test_kv_cache_sampling_and_scoring_agree_with_the_plain_model(fresh_run):
  server = serving.Server(fresh_run)
  setup, params, ex = server.setup, server.params, server.exclusion()
  prompts = [server.encode("Balo Barsk lives_in"), server.encode("Salo Nirsk")]
  greedy = generate.Sampling(max_new=8)
  cached = generate.sample(setup, params, prompts, [3, 4], ex, greedy, eos=10**9)
  plain = generate.sample(setup, params, prompts, [3, 4], ex, greedy, use_cache=False, eos=10**9)
  assert cached == plain
  top1 = generate.sample(setup, params, prompts, [3, 4], ex,
                         generate.Sampling(max_new=8, temperature=0.7, top_k=1), eos=10**9)
  assert top1 == cached
  a = generate.sample(setup, params, prompts, [3, 4], ex, generate.Sampling(8, 1.0, 0, 0.9),
                      seed=3, eos=10**9)
  assert a == generate.sample(setup, params, prompts, [3, 4], ex, generate.Sampling(8, 1.0, 0, 0.9),
                              seed=3, eos=10**9)

  # score = the sum of the answer tokens' log-probabilities under the same gate
  prompt, answer = prompts[0], cached[0][:3]
  got = generate.score(setup, params, [prompt], [answer], [3], ex)[0]
  seq = jnp.asarray([prompt + answer])
  rows = {"tokens": seq, "positions": jnp.arange(seq.shape[1])[None],
          "segment_ids": jnp.ones_like(seq)}
  gate = sinks.make_gate(setup.spec, "source", segment_ids=rows["segment_ids"],
                         row_sources=jnp.asarray([3]), exclude=ex, max_docs=1)
  logp = jax.nn.log_softmax(transformer.apply(setup.graphdef, params, rows, gate)[0])
  want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))
  assert got == pytest.approx(want, rel=1e-4)


def test_router_accuracy_and_capacity(fresh_run):
  server = serving.Server(fresh_run)
  accuracy, n = serving.routing_accuracy(server)
  # the trained sources only (the built-in corpus' 16 validation sources were never trained)
  trained = server.cfg.data.num_sources
  assert n == trained and sorted(server.router.ids.tolist()) == list(range(1, trained + 1))
  assert accuracy > 5 / n   # well above chance (1/n)
  assert os.path.exists(os.path.join(fresh_run, "router.npz"))
  server.board.unlearn([str(i) for i in range(1, 11)], "capacity")
  rows = serving.capacity(fresh_run, [1, 10, 40], sample=16)
  now = [r for r in rows if r["now"]][0]
  assert now["unlearned"] == 10 and [r["unlearned"] for r in rows] == [1, 10, 40]
  assert rows[0]["mean"] <= now["mean"] <= rows[-1]["mean"]
  assert abs(rows[-1]["mean"] - rows[-1]["expected"]) < 0.2


def test_unlearn_and_generate_commands(fresh_run):
  cli = lambda *a: subprocess.run([sys.executable, "-m", "sinkformer", *a], capture_output=True,
                                  text=True, timeout=300)
  out = cli("unlearn", "--run", fresh_run, "--reason", "erasure request", "person-4", "person-6")
  assert out.returncode == 0 and "unlearned 2 source(s)" in out.stdout, out.stderr
  assert "already unlearned" in cli("unlearn", "--run", fresh_run, "--reason", "r", "4").stdout
  show = cli("sources", "show", "--run", fresh_run, "person-4")
  assert '"status": "unlearned"' in show.stdout and "erasure request" in show.stdout
  listed = cli("sources", "list", "--run", fresh_run, "--status", "unlearned")
  assert listed.stdout.splitlines()[0] == "78 active, 2 unlearned"
  gen = cli("generate", "--run", fresh_run, "--prompt", "Balo Barsk", "--mode", "backbone",
            "--max-tokens", "4")
  assert gen.returncode == 0 and "[backbone -> no sinks, policy exclude]" in gen.stdout
  refused = cli("generate", "--run", fresh_run, "--prompt", "x", "--mode", "source:person-4")
  assert refused.returncode == 2 and "has been unlearned" in refused.stderr
  assert cli("sources", "reactivate", "--run", fresh_run, "--reason", "r", "4").returncode == 2
  missing = cli("unlearn", "--run", fresh_run, "person-4")
  assert missing.returncode == 2 and "--reason is required" in missing.stderr

  # A title two built-in sources share: refused with both listed, unless every match is asked for.
  shared = cli("unlearn", "--run", fresh_run, "--reason", "r", "silo rirsk")
  assert shared.returncode == 2 and "names 2 sources" in shared.stderr, shared.stderr
  assert cli("sources", "list", "--run", fresh_run).stdout.splitlines()[0] == "78 active, 2 unlearned"
  both = cli("unlearn", "--run", fresh_run, "--reason", "r", "--all-matching", "Silo Rirsk")
  assert "unlearned 2 source(s)" in both.stdout, both.stderr
