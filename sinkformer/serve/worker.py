"""The thread that owns the model: it batches waiting requests, decodes them chunk by chunk,
and holds every deletion at every chunk boundary.

It takes the requests waiting in its queue (up to `max_batch` prompts, for at most
`window_s` after the first), folds the ledger (Server.refresh: any process may have
unlearned), and decodes them as one batch (rows of different settings share the compiled
sampler). At the start of a batch and after every chunk it folds the ledger again; if that
unlearned sources:
  - rows of a `source:` mode whose source is now unlearned stop: a streaming request ends
    them with finish_reason "unlearned", a non-streaming one is refused (403);
  - a non-streaming request whose tokens were made with units now excluded (the `exclude`
    policy in a sink mode) or routed to a source now unlearned starts again from its prompt
    (nothing of it was sent), with the new mask and routing;
  - a streaming row routed to a source now unlearned stops ("unlearned"; this chunk of it
    is withheld); other streaming rows go on under the new mask.
Then it sends the chunk, lets the event loop write it, and only then confirms the new
ledger position (presence.py). An unlearn returns only once every live server has
confirmed it, so no token made before a deletion is sent after the unlearn returns.
Requests whose client hung up, or past their deadline, stop at the next boundary too; a
request ends as soon as its own rows have.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import sys
import threading
import time
import traceback

import numpy as np

from sinkformer.errors import UserError
from sinkformer.run import presence, switchboard
from sinkformer.serve import generate, serving

POLL_S = 0.02      # an idle worker folds the ledger this often
RESTARTS = 3       # times a request may start again because of unlearning while it decoded


class Deadline(UserError):
  """A request that waited past its deadline before it could start."""


class Restarted(UserError):
  """A request that had to start again too often (the ledger kept changing under it)."""


@dataclasses.dataclass(eq=False)
class Job:
  """One completion request on its way through the worker. `named`: the source its
  `source:` mode names (resolved before it joined the queue; 0 for other modes)."""
  prompts: list[list[int]]   # BOS first
  texts: list[str]
  body: object   # http.Completion: stream, temperature, top_p, seed, max_tokens, ignore_eos,
                 # stop, echo, logprobs
  mode: str      # route | placebo | backbone | source:REF
  named: int
  loop: asyncio.AbstractEventLoop
  events: asyncio.Queue   # ("chunk", choices) ... then ("done", choices) or ("error", exc)
  arrived: float = dataclasses.field(default_factory=time.monotonic)
  cancelled: bool = False   # its client hung up
  restarts: int = 0


class Worker:

  def __init__(self, run_dir: str, policy: str | None, limits):
    self.limits = limits
    self.room = generate.bucket(limits.max_tokens, 16)   # cache slots for new tokens: fixed
    self.queue: queue.Queue[Job] = queue.Queue(maxsize=limits.max_queue)
    self.again: collections.deque[Job] = collections.deque()   # jobs to start over, first
    self.stopping = threading.Event()
    # what /healthz shows: rows decoded and how many were stopped early, by why
    self.stats = collections.Counter()
    ready, failed = threading.Event(), []

    def start():
      try:
        self.server = serving.Server(run_dir, policy=policy)
        self._warm_up()
        self.presence = presence.Presence(run_dir)
        self.presence.confirm(self.server.seq)
      except BaseException as e:
        failed.append(e)
      ready.set()
      if not failed:
        try:
          self._loop()
        finally:
          self.presence.close()

    self.thread = threading.Thread(target=start, name="sinkformer-worker", daemon=True)
    self.thread.start()
    ready.wait()
    if failed:
      raise failed[0]

  def _warm_up(self):
    """Compile the sampler (every gate) and the router for every batch size bucket (short
    prompts, one chunk of tokens), so the first requests of a busy minute do not wait for
    XLA, and neither does an unlearn waiting for this server to confirm it."""
    s = self.server
    prompt = [s.tokenizer.bos] * 4
    rows = 1
    while rows <= generate.bucket(self.limits.max_batch, 1):
      settings = generate.Rows.uniform(rows, generate.Sampling(max_new=1), eos=s.tokenizer.eos)
      for gate in ("source", "backbone") if s.setup.spec else ("dense",):
        for _ in generate.decode(s.setup, s.params, [prompt] * rows, np.zeros(rows, np.int32),
                                 s.exclusion(), settings, gate, vocab=s.tokenizer.vocab_size,
                                 room=self.room):
          pass
      if s.setup.spec is not None:
        s.router.rank(serving.Router.embed(s.setup, s.params, [prompt] * rows), s.alive())
      rows *= 2

  def submit(self, job: Job):
    """Queue a job; queue.Full when `max_queue` jobs are waiting."""
    self.queue.put_nowait(job)

  def queued(self) -> int:
    return self.queue.qsize() + len(self.again)

  def stop(self):
    self.stopping.set()
    self.thread.join(timeout=30)

  def _take(self, timeout: float) -> Job | None:
    if self.again:
      return self.again.popleft()
    try:
      return self.queue.get(timeout=max(0.0, timeout))
    except queue.Empty:
      return None

  def _loop(self):
    while not self.stopping.is_set():
      job = self._take(POLL_S)
      if job is None:   # idle: keep the ledger folded and say so
        try:
          self.server.refresh()
          self.presence.confirm(self.server.seq)
        except UserError as e:   # e.g. a damaged switchboard: every request is refused
          print(f"sinkformer serve: {e}", file=sys.stderr, flush=True)
          time.sleep(1.0)
        continue
      jobs, rows = [job], len(job.prompts)
      until = time.monotonic() + self.limits.window_s
      while rows < self.limits.max_batch:
        more = self._take(until - time.monotonic())
        if more is None:
          break
        jobs.append(more)
        rows += len(more.prompts)
      try:
        self._run(jobs)
      except UserError as e:   # the switchboard could not be read: serve nothing
        for j in jobs:
          _send(j, "error", e)
      except Exception as e:   # a bug: every waiting client hears of it, the worker lives on
        traceback.print_exc()
        for j in jobs:
          _send(j, "error", e)

  def _confirm(self, loops=()):
    """Confirm the ledger position folded in, once the event loops have written what was
    handed to them before."""
    if self.server.seq == self.presence.seen:
      return
    for loop in loops:
      try:
        asyncio.run_coroutine_threadsafe(_settle(), loop).result(timeout=5)
      except Exception:   # a loop that is shutting down sends nothing more
        pass
    self.presence.confirm(self.server.seq)

  def _run(self, jobs: list[Job]):
    s = self.server
    s.refresh()
    self._confirm()   # nothing of these jobs has been made yet
    now, live = time.monotonic(), []
    for job in jobs:
      if job.cancelled:
        continue
      if now - job.arrived > self.limits.deadline_s:
        _send(job, "error", Deadline(f"the request waited {now - job.arrived:.1f} s, past the "
                                     f"server's deadline of {self.limits.deadline_s:g} s"))
      elif job.named in s.unlearned:
        _send(job, "error", switchboard.Refused(f"source id {job.named} has been unlearned; "
                                                "it cannot be served"))
      else:
        live.append(job)
    sources: dict[int, np.ndarray] = {}
    for mode in ("route", "placebo"):   # one router pass for all of a batch's queries
      mine = [j for j in live if j.mode == mode]
      if mine and s.setup.spec is not None:
        try:
          routed = s.route([t for j in mine for t in j.texts], farthest=mode == "placebo")
        except UserError as e:   # every source unlearned
          for j in mine:
            _send(j, "error", e)
            live.remove(j)
          continue
        at = 0
        for j in mine:
          sources[id(j)] = routed[at:at + len(j.texts)]
          at += len(j.texts)
    groups: dict[str, list] = {}
    for job in live:
      rows = sources.get(id(job), np.full(len(job.prompts), job.named, np.int32))
      gate = ("dense" if s.setup.spec is None else
              "backbone" if job.mode == "backbone" else "source")
      groups.setdefault(gate, []).append((job, rows))
    for gate, members in groups.items():
      self._decode(gate, members)
    self.stats["batches"] += 1

  def _decode(self, gate: str, members: list):
    s, tok = self.server, self.server.tokenizer
    prompts, sources, temps, top_ps, seeds, limits, eos, owner = [], [], [], [], [], [], [], []
    for job, rows in members:
      b = job.body
      seed = b.seed if b.seed is not None else int(np.random.default_rng().integers(2**32))
      for i, p in enumerate(job.prompts):
        prompts.append(p)
        sources.append(int(rows[i]))
        temps.append(b.temperature)
        top_ps.append(b.top_p)
        seeds.append((seed + i) % 2**32)
        limits.append(b.max_tokens)
        eos.append(-1 if b.ignore_eos else tok.eos)
        owner.append(job)
    rows_of = {id(job): [r for r, j in enumerate(owner) if j is job] for job, _ in members}
    settings = generate.Rows(np.asarray(temps, np.float32), np.asarray(top_ps, np.float32),
                             np.asarray(seeds, np.uint32), np.asarray(limits, np.int32),
                             np.asarray(eos, np.int32))
    decoder = generate.Decoder(s.setup, s.params, prompts, np.asarray(sources, np.int32),
                               s.exclusion(), settings, gate, vocab=tok.vocab_size,
                               room=self.room)
    self.stats["rows"] += len(prompts)
    kept = [[] for _ in prompts]     # each row's tokens that may be sent
    sent = [(0, "")] * len(prompts)  # each streaming row's tokens and text sent so far
    reason = [None] * len(prompts)   # why a row was stopped: "unlearned", "deadline", "stop"
    cut = {}                         # rows whose text ends before a stop string: that text
    open_jobs = [job for job, _ in members]
    loops = {job.loop for job in open_jobs}
    seq = s.seq
    while open_jobs and not decoder.ended:
      tokens = decoder.next()
      self.stats["chunks"] += 1
      s.refresh()
      moved, seq = s.seq != seq, s.seq
      if moved:
        decoder.exclude = s.exclusion()
      stop, now = [], time.monotonic()
      for job in list(open_jobs):
        mine = rows_of[id(job)]
        verdict = self._verdict(job, mine, sources, reason, moved, gate)
        if verdict is not None:   # the whole request leaves this batch
          stop += mine
          open_jobs.remove(job)
          self.stats[f"requests_{verdict}"] += 1
          continue
        late = now - job.arrived > self.limits.deadline_s
        for r in mine:
          if reason[r] is None:
            kept[r], text = _until_stop(tokens[r], job.body.stop, tok)
            if text is not None:
              reason[r], cut[r] = "stop", text
            elif late:
              reason[r] = "deadline"
              self.stats["rows_deadline"] += 1
          if reason[r]:
            stop.append(r)
      if stop:
        decoder.stop(stop)
      ended = decoder.done_rows()
      for job in list(open_jobs):
        mine = rows_of[id(job)]
        if job.body.stream:
          self._stream(job, mine, kept, sent, cut)
        if all(ended[r] or reason[r] for r in mine):
          self._finish(job, mine, kept, reason, sources, gate, cut)
          open_jobs.remove(job)
      self._confirm(loops)
    for job in open_jobs:
      self._finish(job, rows_of[id(job)], kept, reason, sources, gate, cut)

  def _verdict(self, job: Job, mine: list[int], sources, reason, moved: bool,
               gate: str) -> str | None:
    """What a chunk boundary means for an open request: None (it goes on; rows of a
    streaming request routed to a source now unlearned get reason "unlearned"), or why it
    leaves the batch: "cancelled" (its client left), "refused" (its named source was
    unlearned and nothing was sent), "restarted" (nothing was sent, and what was made used
    units now excluded or a source now unlearned: it starts over)."""
    s = self.server
    if job.cancelled:
      return "cancelled"
    hit = [r for r in mine if moved and reason[r] is None and sources[r] in s.unlearned]
    if job.body.stream:
      for r in (mine if job.named and hit else hit):
        reason[r] = "unlearned"
      self.stats["rows_unlearned"] += len(hit)
      return None
    if job.named and hit:
      _send(job, "error", switchboard.Refused(
          f"source id {job.named} was unlearned while this request was decoding; nothing "
          "of it was sent"))
      return "refused"
    if hit or (moved and gate == "source" and s.policy == "exclude"):
      job.restarts += 1
      if job.restarts > RESTARTS:
        _send(job, "error", Restarted(f"the run's ledger changed {job.restarts} times while "
                                      "this request decoded; try again"))
      else:
        self.again.append(job)
      return "restarted"
    return None

  def _stream(self, job: Job, mine: list[int], kept, sent, cut):
    """Send a streaming request's new text (what its rows may send beyond what they have),
    and how many tokens it is."""
    choices = []
    for i, r in enumerate(mine):
      (count, before), text = sent[r], cut.get(r, self.server.tokenizer.decode(kept[r]))
      if len(kept[r]) > count:
        choices.append({"index": i, "text": text[len(before):] if text.startswith(before)
                        else text, "tokens": len(kept[r]) - count})
        sent[r] = len(kept[r]), text
    if choices:
      _send(job, "chunk", choices)

  def _finish(self, job: Job, mine: list[int], kept, reason, sources, gate: str, cut: dict):
    s, tok = self.server, self.server.tokenizer
    b = job.body
    choices = []
    for i, r in enumerate(mine):
      text = cut.get(r, tok.decode(kept[r]))
      natural = kept[r][-1:] == [tok.eos] and not b.ignore_eos
      choice = {"index": i, "text": job.texts[i] + text if b.echo else text,
                "tokens": len(kept[r]),
                "finish_reason": "stop" if reason[r] == "stop" or natural else
                                 reason[r] or "length",
                "mode": job.mode, "source": s.describe(sources[r]), "policy": s.policy}
      if b.logprobs is not None:
        choice["logprobs"] = self._logprobs(job.prompts[i], kept[r], sources[r], gate,
                                            b.logprobs, b.echo)
      choices.append(choice)
    _send(job, "done", choices)

  def _logprobs(self, prompt: list[int], new: list[int], source: int, gate: str, k: int,
                echo: bool) -> dict:
    """OpenAI's logprobs of a choice: each token's log p given what precedes it, and the k
    likeliest tokens there; the prompt's tokens too with echo (the first given BOS alone)."""
    s, tok = self.server, self.server.tokenizer
    got = generate.token_logprobs(s.setup, s.params, [prompt + new],
                                  np.asarray([source], np.int32), s.exclusion(), gate, k)[0]
    ids = (prompt[1:] if echo else []) + new
    skip = 0 if echo else len(prompt) - 1
    offsets = []
    for n in range(len(ids)):   # where each token's text starts in the decoded text (after a
      before, upto = len(tok.decode(ids[:n])), tok.decode(ids[:n + 1])   # space it does not
      added = upto[before:]                                             # carry itself)
      offsets.append(before + (0 if tok.piece(ids[n]).startswith("\u2581")
                               else len(added) - len(added.lstrip())))
    return {"tokens": [tok.piece(i) for i in ids],
            "token_logprobs": [float(x) for x in got["logp"][skip:]],
            "top_logprobs": None if k == 0 else [
                {tok.piece(i): float(v) for i, v in zip(top_i, top_v)}
                for top_i, top_v in zip(got["top_ids"][skip:], got["top_logp"][skip:])],
            "text_offset": offsets}


def _until_stop(tokens: list[int], stop, tok) -> tuple[list[int], str | None]:
  """(the tokens whose text lies before the first stop string, that text), or (tokens, None)
  when no stop string appears. The text is cut exactly where the stop string begins."""
  if not stop:
    return tokens, None
  text = tok.decode(tokens)
  found = [i for i in (text.find(x) for x in ([stop] if isinstance(stop, str) else stop))
           if i >= 0]
  if not found:
    return tokens, None
  text = text[:min(found)]
  n = 0
  while n < len(tokens) and text.startswith(tok.decode(tokens[:n + 1])):
    n += 1
  return tokens[:n], text


async def _settle():
  """A few turns of the event loop: what the worker handed it before is written by then."""
  for _ in range(4):
    await asyncio.sleep(0)


def _send(job: Job, kind: str, payload):
  try:
    job.loop.call_soon_threadsafe(job.events.put_nowait, (kind, payload))
  except RuntimeError:   # the loop is closed: its client is gone
    pass
