"""A backbone that is differentially private with respect to each source (train.dp).

Everything a source leaves outside its own sink units is in the backbone (`transformer.
backbone_units`: embeddings, attention, norms, the always-on MLP units, backbone heads).
With train.dp.clip > 0 a step updates it with DP-SGD at the level of sources:

  - one document per row (data.max_docs_per_row = 1), so a row is one source's window;
  - each row's backbone gradient is clipped to `clip` (jax-privacy's clipped_grad) and the
    clipped rows summed; the sink units' gradients are summed unclipped;
  - Gaussian noise of std `noise * clip` is added to the backbone sum (jax-privacy's
    gaussian_privatizer, its key in the optimizer state: resumes are exact), masked so the
    sinks get none;
  - the sum is divided by a constant (rows x seq_len), never by the batch's real token
    count, which depends on the data; there is no global-norm clip, which would let one
    source's gradient scale every other parameter's update.

Accounting (dp-accounting, RDP): removing a source changes at most `k` rows of a step (the
most rows it ever has in one batch), so each step is a Gaussian mechanism of sensitivity
k * clip, and the source takes part in at most `E` steps. Both are read off the batch plan,
which is a pure function of the step, so ε is exact for the run's own order, with no
amplification by sampling claimed (the order is a fixed shuffle, not Poisson sampling):
ε(δ) of E self-composed Gaussian mechanisms of noise multiplier noise / k.

What the guarantee covers (docs/method.md): the backbone's whole trajectory is (ε, δ)-DP
with respect to any one source; every other source's sink units only ever see that
trajectory and their own sources' data (a unit outside a source's mask gets no gradient
from its tokens; Adam and decay act per element; nothing normalises by data), and the
forgotten source's own units are zeroed by the `exclude` policy. So sink-off/exclude after
unlearning a source is (ε, δ)-indistinguishable from retraining without it and excluding
the same units.
"""

from __future__ import annotations

import jax
import numpy as np
import optax


def enabled(cfg) -> bool:
  return cfg.train.dp.clip > 0


def backbone_sum(loss_row, params, batch, backbone, clip: float):
  """Σ over rows of each row's backbone gradient clipped to `clip` (the rest of a row's
  gradient is dropped before the norm is taken). `loss_row(params, batch)` is a batch's
  summed loss; each row is passed as a batch of one."""
  from jax_privacy import clipping   # only private runs need it
  grad = clipping.clipped_grad(
      loss_row, l2_clip_norm=clip, batch_argnums=1, keep_batch_dim=True,
      pre_clipping_transform=lambda g: jax.tree.map(lambda x, m: x * m, g, backbone))
  return grad(params, batch)


def backbone_noise(stddev: float, backbone, seed: int) -> optax.GradientTransformation:
  """Gaussian noise of `stddev` on the backbone's elements only (an optimizer's first
  transformation; its key is part of the optimizer state)."""
  from jax_privacy import noise_addition
  privatizer = noise_addition.gaussian_privatizer(stddev=stddev, prng_key=seed)

  def update(updates, state, params=None):
    noisy, state = privatizer.update(updates, state)
    return jax.tree.map(lambda n, g, m: m * n + (1 - m) * g, noisy, updates, backbone), state

  return optax.GradientTransformation(privatizer.init, update)


def participation(sources_per_step) -> tuple[np.ndarray, np.ndarray]:
  """From the batch plan (per step, the source id of every row; 0 = none): (after each step,
  the most steps any one source has taken part in so far; the most rows any source has in
  one step, so far)."""
  steps_of: dict[int, int] = {}
  most_steps, most_rows = [], []
  best_steps = best_rows = 0
  for rows in sources_per_step:
    ids, counts = np.unique(np.asarray(rows)[np.asarray(rows) > 0], return_counts=True)
    for i in ids.tolist():
      steps_of[i] = steps_of.get(i, 0) + 1
      best_steps = max(best_steps, steps_of[i])
    best_rows = max(best_rows, int(counts.max()) if counts.size else 0)
    most_steps.append(best_steps)
    most_rows.append(best_rows)
  return np.asarray(most_steps), np.asarray(most_rows)


def epsilon(noise: float, steps: int, rows: int, delta: float) -> float:
  """ε(δ) of `steps` Gaussian mechanisms of sensitivity `rows` x clip and noise `noise` x
  clip (RDP accountant); inf without noise, 0 for a source that took part in nothing."""
  if steps == 0:
    return 0.0
  if noise <= 0:
    return float("inf")
  import dp_accounting
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise / rows), steps)
  return float(dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta))


def sources_per_step(batches, first: int, last: int, rows) -> list[np.ndarray]:
  """The batch plan of steps [first, last): each row's source (documents are one a row in
  DP mode, so a row's largest source id is its only one)."""
  return [np.asarray(batches.batch(step, rows)["source_ids"]).max(axis=1)
          for step in range(first, last)]


def normalizer(cfg) -> float:
  """What DP steps divide their summed gradients by: fixed, never the data's token count."""
  return float(cfg.train.batch_size * cfg.data.seq_len)
