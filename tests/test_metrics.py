"""Each forgetting metric on an example computed by hand."""

import math
import zlib

import numpy as np
import pytest

from sinkformer.errors import UserError
from sinkformer.eval import metrics


def test_truth_ratio_and_tofu_aggregates():
  # P̄(correct) = 0.5; distractors 0.25 and 0.0625 -> geometric mean 0.125 -> TR = 4
  tr = metrics.truth_ratio([math.log(0.5)], [[math.log(0.25), math.log(0.0625)]])
  assert tr == pytest.approx([4.0])
  assert metrics.mean_logprob([math.log(0.5), math.log(0.125)]) == pytest.approx(math.log(0.25))
  # TR = [4, 0.5] -> R = [0.25, 2]: forget mean(min(R,1/R)) = 0.375, retain mean(max(0,1-R)) = 0.375
  assert metrics.tofu_forget([4, 0.5]) == pytest.approx(0.375)
  assert metrics.tofu_retain([4, 0.5]) == pytest.approx(0.375)


def test_forget_quality_is_the_ks_p_value():
  same = np.linspace(0.5, 2.0, 50)
  assert metrics.forget_quality(same, same) == pytest.approx(1.0)
  assert metrics.forget_quality(same, same + 10) < 1e-10


def test_rouge_exact_memorisation_and_extraction_strength():
  # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 of 6
  assert metrics.rouge_l_recall("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
  assert metrics.rouge_l_recall([1, 2, 3], [3, 2, 1]) == pytest.approx(1 / 3)
  assert metrics.exact_memorization([1, 2, 0, 4], [1, 2, 3, 4]) == 0.75
  assert metrics.extraction_strength([9, 2, 3, 4], [1, 2, 3, 4]) == 0.75   # k = 1
  assert metrics.extraction_strength([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
  assert metrics.extraction_strength([1, 2, 3, 0], [1, 2, 3, 4]) == 0.0
  assert metrics.extraction_strength([1, 0, 3, 4], [1, 2, 3, 4]) == 0.5    # k = 2


def test_membership_scores():
  lps = [-1.0, -2.0, -3.0, -4.0, -5.0]
  assert metrics.loss_score(lps) == 3.0
  assert metrics.min_k_score(lps, 0.4) == 4.5                         # lowest two: -5, -4
  text = "a text to compress"
  assert metrics.zlib_score(lps, text) == pytest.approx(3.0 / len(zlib.compress(text.encode())))
  # p = [1/2, 1/4, 1/4]: mu = -1.5 ln2, sigma = 0.5 ln2 -> z = +1 for token 0, -1 for token 1
  logits = np.log([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])
  np.testing.assert_allclose(metrics.token_zscores(logits, [0, 1]), [1.0, -1.0], atol=1e-9)
  logp = np.log([0.5, 0.25])
  mu, sigma = [-1.5 * np.log(2)] * 2, [0.5 * np.log(2)] * 2
  assert metrics.min_k_plus_plus_score(logp, mu, sigma, 0.5) == pytest.approx(1.0)


def test_auc_and_privleak():
  assert metrics.auc([1, 2], [3, 4]) == 1.0      # forgotten documents look like members
  assert metrics.auc([3, 4], [1, 2]) == 0.0
  assert metrics.auc([1, 2], [1, 2]) == 0.5      # indistinguishable (ties count half)
  assert metrics.auc([1, 3], [2, 2]) == 0.5
  # MUSE's orientation (forget = label 0, scored by -score): a model that memorised the
  # forget set (low losses there) gets AUC 0, so its PrivLeak against a retrain at 0.5 is
  # -100% (MUSE's tables: about -99.8% for the target model); over-unlearning is positive.
  memorised, never_seen = [0.5, 1.0, 1.5], [2.0, 2.5, 3.0]
  assert metrics.muse_auc(memorised, never_seen) == 0.0
  assert metrics.privleak(metrics.muse_auc(memorised, never_seen), 0.5) == pytest.approx(-100.0)
  assert metrics.privleak(metrics.muse_auc(never_seen, memorised), 0.5) == pytest.approx(100.0)
  # a hand case: forget [1, 3], holdout [2, 4]: pairs (h < f) = (2 < 3) -> 1/4
  assert metrics.muse_auc([1, 3], [2, 4]) == pytest.approx(0.25)
  assert metrics.privleak(0.25, 0.5) == pytest.approx(-50.0)
  assert math.isnan(metrics.privleak(0.6, 0.0))


def test_verbatim_extraction_perplexity_acr_and_ci():
  assert metrics.edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
  assert metrics.edit_similarity([], []) == 1.0
  reference = list(range(20))
  assert metrics.extracted(reference[:19] + [99], reference)        # 19/20 = 0.95
  assert not metrics.extracted(reference[:10], reference)
  assert metrics.perplexity([[math.log(0.5)], [math.log(0.125)]]) == pytest.approx(4.0)
  assert metrics.adversarial_compression_ratio(32, 16) == 2.0
  x = np.arange(100.0)   # a 95% CI of the mean spans about 2 x 1.96 standard errors
  low, high = metrics.bootstrap_ci(x)
  assert high - low == pytest.approx(2 * 1.96 * x.std() / 10, rel=0.15)
  assert (low + high) / 2 == pytest.approx(x.mean(), abs=1.0)


def test_the_relearning_split_fine_tunes_chooses_and_reports_on_three_parts():
  from sinkformer.eval import attacks
  docs = [(1, "a1"), (1, "a2"), (1, "a3"), (1, "a4"), (2, "b1"), (3, "c1"), (3, "c2"),
          (3, "c3")]
  a, b, c, split = attacks.relearn_split(docs, "auto")   # a book's chapters: within
  assert split == "within"   # source 2 (one chapter) cannot be split: left out
  assert (a, b, c) == ([(1, "a1"), (1, "a4"), (3, "c1")], [(1, "a2"), (3, "c2")],
                       [(1, "a3"), (3, "c3")])
  a, b, c, split = attacks.relearn_split(docs, "across")
  assert (a, b, c) == (docs[:4], [(2, "b1")], docs[5:])
  a, b, c, split = attacks.relearn_split([(1, "x"), (2, "y"), (3, "z"), (4, "w")], "auto")
  assert split == "across" and (a, b, c) == ([(1, "x"), (4, "w")], [(2, "y")], [(3, "z")])
  with pytest.raises(UserError, match="relearn.split=across"):
    attacks.relearn_split([(1, "x"), (1, "y"), (2, "z")], "within")
  with pytest.raises(UserError, match="three forget sources"):
    attacks.relearn_split([(1, "x"), (2, "y")], "across")


def test_the_bootstrap_draws_whole_sources_and_pairs_models():
  # 10 sources of 5 identical facts each: one fact per source carries all the information,
  # so resampling sources must give the CI of 10 values, not of 50 independent ones
  per_source = np.arange(10.0)
  values, groups = np.repeat(per_source, 5), np.repeat(np.arange(10), 5)
  lo, hi = metrics.bootstrap_ci(values, groups=groups)
  se = per_source.std() / np.sqrt(10)
  assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
  naive_lo, naive_hi = metrics.bootstrap_ci(values)
  assert hi - lo > 2 * (naive_hi - naive_lo)   # sqrt(5) wider than pretending independence
  # paired: two models whose scores differ by the same shift on every document have a gap
  # CI of a single point, whatever the documents; unpaired CIs would be wide
  rng = np.random.default_rng(0)
  f, h = rng.normal(size=20), rng.normal(size=40) + 1
  gap = metrics.paired_auc_gap_ci(f, h, f, h)
  assert gap == (0.0, 0.0)
  lo, hi = metrics.auc_ci(f, h)
  assert lo < metrics.auc(f, h) < hi and hi - lo > 0.1
  # PrivLeak against itself is 0 on every resample
  assert metrics.privleak_ci(f, h, f, h) == (0.0, 0.0)


def test_the_retrain_like_rule_passes_a_perfect_unlearner_and_fails_a_leaky_one():
  """Simulated like the map: 20 forget vs 40 never-seen documents, each with a difficulty
  every model shares, each model's own noise, two retrain seeds. A model equal in
  distribution to the retrain passed the old rule (|gap| <= 0.05) 34-46% of the time."""
  rng = np.random.default_rng(0)

  def model(difficulty, shift=0.0):
    return difficulty + rng.normal(0, 0.5, difficulty.shape) - shift

  verdicts = {"perfect": [], "leaky": [], "old rule, perfect": []}
  for trial in range(100):
    forget_d, holdout_d = rng.normal(size=20), rng.normal(size=40)
    retrain = (model(forget_d), model(holdout_d))
    second = (model(forget_d), model(holdout_d))
    floor = abs(metrics.auc(*second) - metrics.auc(*retrain))
    for name, shift in (("perfect", 0.0), ("leaky", 1.0)):   # lower loss = member-like
      f, h = model(forget_d, shift), model(holdout_d)
      gap = metrics.paired_auc_gap_ci(f, h, *retrain, n=300, seed=trial)
      verdicts[name].append(metrics.retrain_like(gap, floor))
      if name == "perfect":
        verdicts["old rule, perfect"].append(abs(metrics.auc(f, h) - metrics.auc(*retrain)) <= 0.05)
  assert np.mean(verdicts["perfect"]) >= 0.9
  assert np.mean(verdicts["leaky"]) <= 0.1
  assert np.mean(verdicts["old rule, perfect"]) <= 0.6
