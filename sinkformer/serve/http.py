"""`sinkformer serve`: a run behind an OpenAI-style HTTP API, with live deletions.

Routes (FastAPI on uvicorn):
  POST /v1/completions     prompt(s), max_tokens, temperature, top_p, seed, stream, and the
                           NULL's `mode` (route | source:REF | backbone | placebo); every
                           choice names its mode, the source used and the policy
  GET  /v1/sources/{ref}   the sources a reference names, their status and ledger
  GET  /v1/sources         a page of sources (?status=active|unlearned&offset=&limit=)
  POST /v1/unlearn         sources, reason, who, all_matching: one ledgered transaction
  POST /v1/reactivate      likewise, where the run's config allows it
  GET  /healthz            run, step, source counts, ledger position, queue length

One worker thread owns the model: it takes the requests waiting in its queue (up to
`max_batch` prompts, for at most `window_s` after the first), folds every ledger entry
committed so far into the exclusion mask and the refusals, resolves each request's sources,
and decodes all of them as one batch (rows of different settings share the compiled
sampler), streaming each chunk of tokens to the requests that asked for it. A deletion
whose call has returned (this server's /v1/unlearn or `sinkformer unlearn` in another
process) is therefore in force for every request that arrives after it.

Unlearning and reactivation need `Authorization: Bearer TOKEN`; without a configured token
those routes answer 403 and nothing else is open. Request sizes are bounded (`Limits`),
malformed bodies get 422 naming the field, every SQL value is a bound parameter, and no
client input names a file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import queue
import threading
import time
import uuid
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from sinkformer.data import catalog
from sinkformer.errors import UserError
from sinkformer.serve import generate, serving, switchboard


@dataclasses.dataclass(frozen=True)
class Limits:
  max_prompts: int = 16          # prompts in one request
  max_prompt_tokens: int = 512   # tokens of one prompt
  max_tokens: int = 256          # new tokens of one prompt
  max_batch: int = 32            # prompts decoded together
  window_s: float = 0.005        # how long the first request of a batch waits for company


class Completion(BaseModel):
  model_config = {"extra": "forbid"}
  prompt: str | list[str]
  max_tokens: int = Field(16, ge=1)
  temperature: float = Field(0.0, ge=0.0, le=10.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  seed: int | None = Field(None, ge=0, lt=2**32)
  stream: bool = False
  mode: str = "route"
  model: str | None = None       # accepted for client compatibility; the server has one run


class Change(BaseModel):
  model_config = {"extra": "forbid"}
  sources: list[str] = Field(min_length=1, max_length=10_000)
  reason: str = Field(min_length=1, max_length=2_000)
  who: str | None = Field(None, max_length=200)
  all_matching: bool = False


@dataclasses.dataclass(eq=False)
class Job:
  """One completion request on its way through the worker."""
  prompts: list[list[int]]
  texts: list[str]
  body: Completion
  loop: asyncio.AbstractEventLoop
  events: asyncio.Queue          # ("chunk", choices) ... then ("done", response) or ("error", exc)
  arrived: float = dataclasses.field(default_factory=time.monotonic)


class Worker:
  """The thread that owns the model (and its SQLite connection) and decodes batches of
  waiting requests."""

  def __init__(self, run_dir: str, policy: str | None, limits: Limits):
    self.limits = limits
    self.room = generate.bucket(limits.max_tokens, 16)   # cache slots for new tokens: fixed
    self.queue: queue.Queue[Job | None] = queue.Queue()
    ready, failed = threading.Event(), []

    def start():
      try:
        self.server = serving.Server(run_dir, policy=policy)
        self._warm_up()
      except BaseException as e:
        failed.append(e)
      ready.set()
      if not failed:
        self._loop()

    self.thread = threading.Thread(target=start, name="sinkformer-worker", daemon=True)
    self.thread.start()
    ready.wait()
    if failed:
      raise failed[0]

  def _warm_up(self):
    """Compile the sampler and the router for every batch size bucket (short prompts, one
    chunk of tokens), so the first requests of a busy minute do not wait for XLA."""
    s = self.server
    prompt = [s.tokenizer.bos] * 4
    rows = 1
    while rows <= generate.bucket(self.limits.max_batch, 1):
      settings = generate.Rows(np.zeros(rows, np.float32), np.ones(rows, np.float32),
                               np.zeros(rows, np.uint32), np.ones(rows, np.int32))
      for _ in generate.decode(s.setup, s.params, [prompt] * rows, np.zeros(rows, np.int32),
                               s.exclusion(), settings, "source" if s.setup.spec else "dense",
                               eos=s.tokenizer.eos, vocab=s.tokenizer.vocab_size,
                               room=self.room):
        pass
      if s.setup.spec is not None:
        s.router.rank(serving.Router.embed(s.setup, s.params, [prompt] * rows), s.alive())
      rows *= 2

  def submit(self, job: Job):
    self.queue.put(job)

  def stop(self):
    self.queue.put(None)
    self.thread.join(timeout=30)

  def _loop(self):
    while True:
      job = self.queue.get()
      if job is None:
        return
      jobs, rows = [job], len(job.prompts)
      deadline = time.monotonic() + self.limits.window_s
      while rows < self.limits.max_batch:
        try:
          more = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        if more is None:
          self.queue.put(None)
          break
        jobs.append(more)
        rows += len(more.prompts)
      try:
        self._run(jobs)
      except Exception as e:   # a bug: every waiting client hears of it, the worker lives on
        for j in jobs:
          _send(j, "error", e)

  def _run(self, jobs: list[Job]):
    self.server.refresh()   # every deletion committed before this batch is in force
    resolved = {}
    routed = [j for j in jobs if j.body.mode in ("route", "placebo")]
    for mode in ("route", "placebo"):   # one router pass for all of a batch's queries
      mine = [j for j in routed if j.body.mode == mode]
      if mine:
        try:
          sources, gate = self.server.sources_for([t for j in mine for t in j.texts], mode)
        except UserError as e:   # e.g. every source unlearned
          for j in mine:
            _send(j, "error", e)
          continue
        at = 0
        for j in mine:
          resolved[id(j)] = sources[at:at + len(j.texts)], gate
          at += len(j.texts)
    groups: dict[str, list] = {}
    for job in jobs:
      if job in routed:
        if id(job) not in resolved:   # its routing failed, and it has been answered
          continue
        sources, gate = resolved[id(job)]
      else:
        try:
          sources, gate = self.server.sources_for(job.texts, job.body.mode)
        except UserError as e:   # a refused, ambiguous or unknown source; a bad mode
          _send(job, "error", e)
          continue
      groups.setdefault(gate, []).append((job, sources))
    for gate, members in groups.items():
      self._decode(gate, members)

  def _decode(self, gate: str, members: list):
    s, tok = self.server, self.server.tokenizer
    prompts, sources, temps, top_ps, seeds, limits, owner = [], [], [], [], [], [], []
    for job, rows in members:
      b = job.body
      seed = b.seed if b.seed is not None else int(np.random.default_rng().integers(2**32))
      for i, p in enumerate(job.prompts):
        prompts.append(p)
        sources.append(rows[i])
        temps.append(b.temperature)
        top_ps.append(b.top_p)
        seeds.append((seed + i) % 2**32)
        limits.append(b.max_tokens)
        owner.append((job, i))
    settings = generate.Rows(np.asarray(temps, np.float32), np.asarray(top_ps, np.float32),
                             np.asarray(seeds, np.uint32), np.asarray(limits, np.int32))
    sent = [""] * len(prompts)
    final = None
    for final in generate.decode(s.setup, s.params, prompts, np.asarray(sources, np.int32),
                                 s.exclusion(), settings, gate, eos=tok.eos,
                                 vocab=tok.vocab_size, room=self.room):
      deltas: dict[int, list] = {}
      for r, tokens in enumerate(final):
        text = tok.decode(tokens)
        job, i = owner[r]
        if job.body.stream and text != sent[r]:
          deltas.setdefault(id(job), [job, []])[1].append(
              {"index": i, "text": text[len(sent[r]):] if text.startswith(sent[r]) else text})
        sent[r] = text
      for job, choices in deltas.values():
        _send(job, "chunk", choices)
    for job, rows in members:
      mine = [r for r, (j, _) in enumerate(owner) if j is job]
      choices = [{"index": i, "text": sent[r], "tokens": len(final[r]),
                  "finish_reason": "stop" if final[r][-1:] == [tok.eos] else "length",
                  "mode": job.body.mode, "source": s.describe(int(rows[i])),
                  "policy": s.policy}
                 for i, r in enumerate(mine)]
      _send(job, "done", choices)


def _send(job: Job, kind: str, payload):
  job.loop.call_soon_threadsafe(job.events.put_nowait, (kind, payload))


def _status(e: Exception) -> int:
  if isinstance(e, switchboard.Refused):
    return 403
  if isinstance(e, catalog.Ambiguous):
    return 409
  return 400 if isinstance(e, UserError) else 500


def create_app(run_dir: str, token: str | None = None, limits: Limits = Limits(),
               policy: str | None = None) -> FastAPI:
  worker = Worker(run_dir, policy, limits)
  server = worker.server   # read-only here (tokenizer, config); the worker thread runs it
  name = run_dir.rstrip("/").rsplit("/", 1)[-1]
  app = FastAPI(title="sinkformer", summary=f"run {run_dir}, step {server.step}")
  app.router.on_shutdown.append(worker.stop)

  def board():
    b = switchboard.Switchboard(run_dir)
    try:
      yield b
    finally:
      b.close()

  def admin(authorization: str | None = Header(None)):
    if token is None:
      raise HTTPException(403, "unlearning over HTTP is off: start the server with "
                               "--token-file FILE or SINKFORMER_ADMIN_TOKEN set")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
      raise HTTPException(401, "a valid 'Authorization: Bearer TOKEN' header is required",
                          headers={"WWW-Authenticate": "Bearer"})

  @app.exception_handler(UserError)
  async def user_error(_, e: UserError):
    return JSONResponse({"detail": str(e)}, status_code=_status(e))

  @app.post("/v1/completions")
  async def completions(body: Completion):
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not 1 <= len(texts) <= limits.max_prompts:
      raise HTTPException(400, f"prompt: 1 to {limits.max_prompts} prompts per request, got "
                               f"{len(texts)}")
    if body.max_tokens > limits.max_tokens:
      raise HTTPException(400, f"max_tokens: at most {limits.max_tokens}, got {body.max_tokens}")
    prompts = [server.encode(t) for t in texts]
    longest = max(len(p) for p in prompts)
    if longest > limits.max_prompt_tokens:
      raise HTTPException(400, f"prompt: at most {limits.max_prompt_tokens} tokens per prompt, "
                               f"got {longest}")
    job = Job(prompts, texts, body, asyncio.get_running_loop(), asyncio.Queue())
    worker.submit(job)
    meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
            "created": int(time.time()), "model": body.model or name}
    if body.stream:
      return StreamingResponse(_stream(job, meta), media_type="text/event-stream")
    while True:
      kind, payload = await job.events.get()
      if kind == "error":
        raise payload if isinstance(payload, UserError) else HTTPException(500, repr(payload))
      if kind == "done":
        return {**meta, "choices": payload, "policy": server.policy,
                "usage": {"prompt_tokens": sum(map(len, prompts)),
                          "completion_tokens": sum(c["tokens"] for c in payload)}}

  async def _stream(job: Job, meta: dict):
    while True:
      kind, payload = await job.events.get()
      if kind == "error":
        yield f"data: {json.dumps({'error': {'message': str(payload), 'status': _status(payload)}})}\n\n"
        return
      if kind == "chunk":
        yield f"data: {json.dumps({**meta, 'choices': payload})}\n\n"
      else:
        done = [{k: c[k] for k in ("index", "finish_reason", "mode", "source", "policy")}
                for c in payload]
        yield f"data: {json.dumps({**meta, 'choices': done})}\n\n"
        yield "data: [DONE]\n\n"
        return

  @app.get("/v1/sources/{ref:path}")
  def source(ref: str, b: switchboard.Switchboard = Depends(board)):
    rows = b.resolve([ref], all_matching=True)
    return {"sources": [{**r, "ledger": b.ledger(r["id"])} for r in rows]}

  @app.get("/v1/sources")
  def sources(status: Literal["active", "unlearned"] | None = None,
              offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=1000),
              b: switchboard.Switchboard = Depends(board)):
    return {"counts": b.counts(), "sources": b.page(status, offset, limit)}

  def change(action: str, body: Change, b: switchboard.Switchboard):
    if action == "unlearn":
      got = b.unlearn(body.sources, body.reason, body.who or "http", body.all_matching)
    else:
      got = b.reactivate(body.sources, body.reason, body.who or "http",
                         allowed=server.cfg.unlearn.allow_reactivation,
                         all_matching=body.all_matching)
    return {**got, "ledger_seq": b.ledger_seq()}

  @app.post("/v1/unlearn", dependencies=[Depends(admin)])
  def unlearn(body: Change, b: switchboard.Switchboard = Depends(board)):
    return change("unlearn", body, b)

  @app.post("/v1/reactivate", dependencies=[Depends(admin)])
  def reactivate(body: Change, b: switchboard.Switchboard = Depends(board)):
    return change("reactivate", body, b)

  @app.get("/healthz")
  def health(b: switchboard.Switchboard = Depends(board)):
    return {"status": "ok", "run": run_dir, "step": server.step, "policy": server.policy,
            "sources": b.counts(), "ledger_seq": b.ledger_seq(),
            "queued": worker.queue.qsize()}

  return app
