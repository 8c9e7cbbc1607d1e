"""GCG: a prompt it reports as successful makes greedy generation emit the target, and the
search finds short prompts that exist."""

import numpy as np

from sinkformer import engine
from sinkformer.eval import gcg
from sinkformer.model import transformer
from sinkformer.serve import generate

BOS = 2


def greedy(setup, params, prompt, n):
  out = generate.sample(setup, params, [[BOS, *prompt]], np.asarray([7], np.int32), None,
                        generate.Sampling(max_new=n), mode="source", eos=-1)
  return out[0]


def test_found_prompts_reproduce_the_target(smoke_cfg):
  setup = engine.build(smoke_cfg)
  params = transformer.init(setup.dims, 0)
  secret = [101, 202]
  target = greedy(setup, params, secret, 6)
  # a start from the true context succeeds at once and is the shortest length tried
  budget = gcg.Budget(lengths=(2, 4), steps=3, top_k=8, candidates=8, init="prefix")
  found = gcg.shortest_prompt(setup, params, target, [9, 9, *secret], 7, None, "source", budget, BOS)
  assert found["prompt_tokens"] == 2 and found["prompt"] == secret
  # from random tokens, the gradient-guided search finds some 2-token prompt
  budget = gcg.Budget(lengths=(2,), steps=40, top_k=64, candidates=64, init="random")
  found = gcg.shortest_prompt(setup, params, target, [], 7, None, "source", budget, BOS, seed=1)
  assert found["prompt_tokens"] == 2
  assert greedy(setup, params, found["prompt"], len(target)) == target
  assert min(found["prompt"]) >= gcg.FIRST_FREE


def test_unreachable_targets_are_reported_not_found(smoke_cfg):
  setup = engine.build(smoke_cfg)
  params = transformer.init(setup.dims, 0)
  target = [5, 400, 5, 400, 5, 400, 5, 400]
  budget = gcg.Budget(lengths=(1, 2), steps=2, top_k=4, candidates=4, init="random")
  found = gcg.shortest_prompt(setup, params, target, [], 7, None, "source", budget, BOS)
  assert found["prompt_tokens"] is None and np.isfinite(found["loss"])
  assert greedy(setup, params, found["prompt"], len(target)) != target
