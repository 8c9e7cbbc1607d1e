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


def test_the_relearning_split_within_and_across_sources():
  from sinkformer.eval import attacks
  docs = [(1, "a1"), (1, "a2"), (1, "a3"), (2, "b1"), (3, "c1"), (3, "c2")]
  a, b, split = attacks.relearn_split(docs, "auto")   # a book's chapters: within
  assert split == "within"
  assert a == [(1, "a1"), (1, "a3"), (2, "b1"), (3, "c1")] and b == [(1, "a2"), (3, "c2")]
  a, b, split = attacks.relearn_split(docs, "across")
  assert (a, b) == ([(1, "a1"), (1, "a2"), (1, "a3"), (3, "c1"), (3, "c2")], [(2, "b1")])
  a, b, split = attacks.relearn_split([(1, "x"), (2, "y"), (3, "z")], "auto")
  assert split == "across" and a == [(1, "x"), (3, "z")] and b == [(2, "y")]
  with pytest.raises(UserError, match="relearn.split=across"):
    attacks.relearn_split([(1, "x"), (2, "y")], "within")
