"""Forgetting metrics as TOFU, MUSE and the NULL paper define them (pure numpy/scipy).

Inputs are per-token log-probabilities of the answer/document tokens (what
`generate.score`-style teacher forcing gives), greedy or argmax token lists, and texts.
Conventions: membership scores are *higher = less member-like*; an AUC is the probability
that a never-seen document scores higher than a forgotten one (0.5 = the forgotten
documents look unseen, 1 = they look like training data).
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy import stats


def mean_logprob(token_logps) -> float:
  """log P̄(y|x): the mean log-probability over the answer's tokens."""
  return float(np.mean(token_logps))


def truth_ratio(correct, distractors) -> np.ndarray:
  """TR = P̄(correct) / geometric mean_j P̄(distractor_j), per item.

  correct: [N] mean log-probs (log P̄) of the true answers; distractors: [N, J] of the
  distractors. Returns TR [N] (> 1: the model prefers the truth).
  """
  correct, distractors = np.asarray(correct, float), np.asarray(distractors, float)
  return np.exp(correct - distractors.mean(axis=-1))


def tofu_forget(tr) -> float:
  """TOFU's forget-set aggregate mean(min(R, 1/R)), R = 1/TR (1 = no preference left)."""
  r = 1.0 / np.asarray(tr, float)
  return float(np.mean(np.minimum(r, 1.0 / r)))


def tofu_retain(tr) -> float:
  """TOFU's aggregate for other sets: mean(max(0, 1 - R)), R = 1/TR."""
  return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / np.asarray(tr, float))))


def forget_quality(tr_unlearned, tr_retrain) -> float:
  """Two-sided KS p-value between per-item TRs of the unlearned and the retrained model."""
  return float(stats.ks_2samp(tr_unlearned, tr_retrain).pvalue)


def _lcs(a, b) -> int:
  row = [0] * (len(b) + 1)
  for x in a:
    diagonal = 0
    for j, y in enumerate(b, start=1):
      diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
  return row[-1]


def _words(x):
  return x.split() if isinstance(x, str) else list(x)


def rouge_l_recall(prediction, reference) -> float:
  """LCS(prediction, reference) / len(reference), over words (strings) or token lists."""
  p, r = _words(prediction), _words(reference)
  return _lcs(p, r) / len(r) if r else 0.0


def exact_memorization(argmax, answer) -> float:
  """Fraction of answer tokens that the teacher-forced argmax predicts."""
  argmax, answer = np.asarray(argmax), np.asarray(answer)
  return float(np.mean(argmax == answer))


def extraction_strength(argmax, answer) -> float:
  """1 - k/T for the smallest k from which the teacher-forced argmax matches the rest of the
  answer (1: the whole answer, 0: not even its last token)."""
  wrong = np.flatnonzero(np.asarray(argmax) != np.asarray(answer))
  k = 0 if wrong.size == 0 else int(wrong[-1]) + 1
  return 1.0 - k / len(answer)


def loss_score(token_logps) -> float:
  return -float(np.mean(token_logps))


def zlib_score(token_logps, text: str) -> float:
  """Loss divided by the zlib-compressed length of the text (in bytes)."""
  return loss_score(token_logps) / len(zlib.compress(text.encode()))


def min_k_score(token_logps, k: float = 0.4) -> float:
  """Min-K%: minus the mean of the lowest k fraction of token log-probs."""
  lp = np.sort(np.asarray(token_logps, float))
  return -float(lp[:max(1, int(len(lp) * k))].mean())


def token_zscores(logits, targets) -> np.ndarray:
  """Min-K%++'s per-token z from logits [T, V] (the reference formula; the suites get log p,
  mu and sigma from the jitted generate.token_stats and call min_k_plus_plus_score)."""
  logits = np.asarray(logits, float)
  logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  p = np.exp(logp)
  mu = (p * logp).sum(-1)
  sigma = np.sqrt(np.maximum((p * logp ** 2).sum(-1) - mu ** 2, 1e-12))
  return (logp[np.arange(len(targets)), targets] - mu) / sigma


def min_k_plus_plus_score(token_logps, mu, sigma, k: float = 0.4) -> float:
  """Min-K%++: Min-K% over the z-scored token log-probs, z = (log p(target) - mu) / sigma
  with mu and sigma of log p(v) under the model's own distribution at that position."""
  z = (np.asarray(token_logps, float) - np.asarray(mu, float)) / np.asarray(sigma, float)
  return min_k_score(z, k)


def auc(forget_scores, holdout_scores) -> float:
  """Membership AUC of loss-like scores (lower = more member-like): P(a never-seen document
  scores higher than a forgotten one), ties counted half. 1: the forgotten documents look
  like members; 0.5: indistinguishable."""
  f, h = np.asarray(forget_scores, float), np.asarray(holdout_scores, float)
  ranks = stats.rankdata(np.concatenate([f, h]))   # ties share their mean rank: counted half
  return float((ranks[len(f):].sum() - len(h) * (len(h) + 1) / 2) / (len(f) * len(h)))


def muse_auc(forget_scores, holdout_scores) -> float:
  """The AUC as MUSE orients it (forget = label 0, holdout = label 1, scored by -score):
  P(a never-seen document scores lower than a forgotten one), i.e. 1 - auc. A model that
  memorised the forget set gets ~0, a retrain ~0.5."""
  return 1.0 - auc(forget_scores, holdout_scores)


def privleak(muse_auc_unlearned: float, muse_auc_retrain: float) -> float:
  """MUSE's PrivLeak in %: (AUC_unlearned - AUC_retrain) / AUC_retrain * 100 with both AUCs
  oriented as MUSE orients them (`muse_auc`, on Min-K% with k = 40% in MUSE's tables). ~0 is
  ideal; strongly negative: the forget set still looks trained on (under-unlearning);
  positive: it looks less trained on than never-seen text (over-unlearning). NaN when
  AUC_retrain is 0, where it is undefined."""
  if muse_auc_retrain == 0:
    return float("nan")
  return (muse_auc_unlearned - muse_auc_retrain) / muse_auc_retrain * 100.0


def edit_similarity(a, b) -> float:
  """1 - Levenshtein(a, b) / max(len): 1 for identical sequences (strings or token lists)."""
  a, b = list(a), list(b)
  if not a and not b:
    return 1.0
  row = list(range(len(b) + 1))
  for i, x in enumerate(a, start=1):
    previous, row[0] = row[0], i
    for j, y in enumerate(b, start=1):
      previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
  return 1.0 - row[-1] / max(len(a), len(b))


def extracted(continuation, reference, threshold: float = 0.9) -> bool:
  """A greedy continuation reproduces the reference: ROUGE-L recall or normalised edit
  similarity at least `threshold`."""
  return (rouge_l_recall(continuation, reference) >= threshold
          or edit_similarity(_words(continuation), _words(reference)) >= threshold)


def perplexity(token_logps) -> float:
  return float(np.exp(-np.mean(np.concatenate([np.ravel(x) for x in token_logps]))))


def adversarial_compression_ratio(target_tokens: int, prompt_tokens: int) -> float:
  """ACR = target length / length of the shortest prompt that reproduces it (> 1: memorised)."""
  return target_tokens / prompt_tokens


def _members(groups, count: int) -> list[np.ndarray]:
  """Item indices per group (None: every item its own group)."""
  if groups is None:
    return [np.asarray([i]) for i in range(count)]
  _, inverse = np.unique(np.asarray(groups), return_inverse=True)
  return [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]


def bootstrap(statistic, samples, n: int = 2000, level: float = 0.95,
              seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap CI of `statistic(*arrays)`. `samples`: [(arrays, groups)], each a
  tuple of arrays aligned item by item (e.g. two models' scores of the same documents: a
  paired bootstrap) resampled together by `groups`: whole groups drawn with replacement (a
  source's facts or documents are not independent), None: items independent. The statistic
  gets every sample's resampled arrays, in order."""
  rng = np.random.default_rng(seed)
  prepared = [(tuple(np.asarray(a, float) for a in arrays), _members(groups, len(arrays[0])))
              for arrays, groups in samples]
  draws = []
  for _ in range(n):
    args = []
    for arrays, members in prepared:
      index = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
      args += [a[index] for a in arrays]
    draws.append(statistic(*args))
  tail = (1 - level) / 2 * 100
  return float(np.nanpercentile(draws, tail)), float(np.nanpercentile(draws, 100 - tail))


def bootstrap_ci(values, statistic=np.mean, level: float = 0.95, n: int = 2000,
                 seed: int = 0, groups=None) -> tuple[float, float]:
  """Percentile bootstrap CI of `statistic` over items (over groups of items: `groups`)."""
  return bootstrap(statistic, [((values,), groups)], n, level, seed)


def auc_ci(forget_scores, holdout_scores, forget_groups=None, holdout_groups=None,
           n: int = 2000, seed: int = 0) -> tuple[float, float]:
  """95% bootstrap CI of `auc`, forget and never-seen documents resampled by source."""
  return bootstrap(auc, [((forget_scores,), forget_groups), ((holdout_scores,), holdout_groups)],
                   n, seed=seed)


def paired_auc_gap_ci(forget_a, holdout_a, forget_b, holdout_b, forget_groups=None,
                      holdout_groups=None, n: int = 2000, seed: int = 0) -> tuple[float, float]:
  """95% paired bootstrap CI of auc(a) - auc(b): two models' scores of the same documents,
  resampled together (by source), so what the documents share cancels."""
  return bootstrap(lambda fa, fb, ha, hb: auc(fa, ha) - auc(fb, hb),
                   [((forget_a, forget_b), forget_groups),
                    ((holdout_a, holdout_b), holdout_groups)], n, seed=seed)


def privleak_ci(forget_a, holdout_a, forget_b, holdout_b, forget_groups=None,
                holdout_groups=None, n: int = 2000, seed: int = 0) -> tuple[float, float]:
  """95% paired bootstrap CI of privleak(model a against the retrain b) (MUSE's AUCs)."""
  return bootstrap(lambda fa, fb, ha, hb: privleak(muse_auc(fa, ha), muse_auc(fb, hb)),
                   [((forget_a, forget_b), forget_groups),
                    ((holdout_a, holdout_b), holdout_groups)], n, seed=seed)


def retrain_like(gap_ci: tuple[float, float], noise_floor: float) -> bool:
  """Whether a model is as close to the retrain as the data can tell: the paired CI of its
  AUC gap to the retrain reaches into [-floor, floor], where the floor is how far a second
  retrain (another seed) lands from the first. A model equal in distribution to the retrain
  meets it about as often as the CI covers (tested by simulation); a shifted one does not."""
  lo, hi = gap_ci
  return lo <= noise_floor and hi >= -noise_floor
