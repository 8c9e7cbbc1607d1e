"""`sinkformer serve`: a run behind an OpenAI-style HTTP API, with live deletions.

Routes (FastAPI on uvicorn):
  POST /v1/completions     prompt(s), max_tokens, temperature, top_p, seed, stream, and the
                           NULL's `mode` (route | source:REF | backbone | placebo); every
                           choice names its mode, the source used and the policy
  GET  /v1/sources/{ref}   the sources a reference names, their status and ledger
  GET  /v1/sources         a page of sources (?status=active|unlearned&offset=&limit=)
  POST /v1/unlearn         sources, reason, who, all_matching: one ledgered transaction
  POST /v1/reactivate      likewise, where the run's config allows it
  GET  /healthz            run, step, source counts, ledger position (committed and in
                           force here), queue length
  GET  /v1/models          the run, and the run in each mode as NAME@MODE
  GET  /tokenizer_info, POST /tokenize, POST /detokenize   the run's tokenizer (vLLM's
                           endpoints: lm-evaluation-harness scores with them)

Decoding is the worker's (worker.py); this module decides everything about a request
before it joins a batch: a malformed request is a 4xx naming the field (422 for the body's
shape, 400 for a value out of bounds or a bad mode, 403 for an unlearned source, 409 for
an ambiguous one), so one request's mistake never touches another's. Bodies over
`max_body_bytes` are refused before they are parsed (413), prompts are tokenized off the
event loop, error bodies quote at most a short excerpt, a full queue is a 429 with
Retry-After, and an unexpected failure is a 500 that names nothing internal.

Unlearning and reactivation need `Authorization: Bearer TOKEN`, a token of at least
MIN_TOKEN characters; without one those routes answer 403. Every SQL value is a bound
parameter, and no client input names a file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import queue
import sys
import time
import traceback
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sinkformer.data import catalog
from sinkformer.errors import UserError
from sinkformer.run import switchboard
from sinkformer.serve import serving, worker as worker_lib

MIN_TOKEN = 16
TOKEN_ENV = "SINKFORMER_ADMIN_TOKEN"
CHARS_PER_TOKEN = 64   # a prompt longer than this many characters per allowed token is refused untokenized
EXCERPT = 300          # characters of an error message (or of anything it quotes) at most


@dataclasses.dataclass(frozen=True)
class Limits:
  max_prompts: int = 16          # prompts in one request
  max_prompt_tokens: int = 512   # tokens of one prompt
  max_tokens: int = 256          # new tokens of one prompt
  max_batch: int = 32            # prompts decoded together
  window_s: float = 0.005        # how long the first request of a batch waits for company
  max_queue: int = 256           # requests waiting for the worker (then 429)
  deadline_s: float = 120.0      # a request's time from arrival to its last token
  max_body_bytes: int = 4 << 20  # a request body, before it is parsed


Tokens = list[Annotated[int, Field(ge=0)]]


class Completion(BaseModel):
  model_config = {"extra": "forbid"}
  prompt: str | list[str] | Tokens | list[Tokens]   # text(s) or token ids (no BOS)
  max_tokens: int = Field(16, ge=0)                 # 0: score the prompt only (with echo)
  temperature: float = Field(0.0, ge=0.0, le=10.0, allow_inf_nan=False)
  top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
  seed: int | None = Field(None, ge=0, lt=2**32)
  ignore_eos: bool = False       # generate exactly max_tokens (load tests), as vLLM's
  stop: str | list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
      None, max_length=4)         # the text ends before the first of these
  echo: bool = False             # the prompt comes back in front of the text (and its logprobs)
  logprobs: int | None = Field(None, ge=0, le=5)   # per token: its log p and the top ones
  n: int = Field(1, ge=1, le=1)  # one choice per prompt
  user: str | None = Field(None, max_length=200)   # accepted, unused
  stream: bool = False
  mode: str | None = Field(None, max_length=1_000)   # default: the model's @MODE, else route
  model: str | None = Field(None, max_length=1_000)  # NAME or NAME@MODE (GET /v1/models)


class Tokenize(BaseModel):
  prompt: str = Field(max_length=1 << 20)
  add_special_tokens: bool = True


class Detokenize(BaseModel):
  tokens: Tokens = Field(max_length=1 << 16)


class Change(BaseModel):
  model_config = {"extra": "forbid"}
  sources: list[Annotated[str, Field(min_length=1, max_length=1_000)]] = Field(
      min_length=1, max_length=10_000)
  reason: str = Field(min_length=1, max_length=2_000)
  who: str | None = Field(None, max_length=200)
  all_matching: bool = False


def admin_token(token_file: str | None = None, environ=os.environ) -> str | None:
  """The admin token from `token_file` or $SINKFORMER_ADMIN_TOKEN (None: neither is set).
  An empty or short token from either is refused: it would open the admin routes to a
  guess."""
  if token_file:
    try:
      with open(token_file) as f:
        token, where = f.read().strip(), f"--token_file {token_file}"
    except OSError as e:
      raise UserError(f"--token_file {token_file}: {e.strerror}") from None
  elif TOKEN_ENV in environ:
    token, where = environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
  else:
    return None
  _check_token(token, where)
  return token


def _check_token(token: str, where: str):
  if len(token) < MIN_TOKEN:
    raise UserError(f"{where}: the admin token has {len(token)} characters; use at least "
                    f"{MIN_TOKEN} (e.g. 'openssl rand -hex 24'), or set none to keep "
                    "unlearning over HTTP off")


def _excerpt(text: str) -> str:
  text = str(text)
  return text if len(text) <= EXCERPT else text[:EXCERPT] + f"... ({len(text):,} characters)"


def _status(e: Exception) -> int:
  if isinstance(e, switchboard.Refused):
    return 403
  if isinstance(e, catalog.Ambiguous):
    return 409
  if isinstance(e, (switchboard.Busy, switchboard.Damaged, worker_lib.Restarted)):
    return 503
  if isinstance(e, worker_lib.Deadline):
    return 504
  return 400 if isinstance(e, UserError) else 500


def _error_body(e: Exception, status: int | None = None) -> dict:
  """FastAPI's `detail` and OpenAI's `error` (what its clients read), both."""
  status = _status(e) if status is None else status
  message = ("internal error; the server's log has the details" if status == 500   # a bug
             else _excerpt(e.detail if isinstance(e, HTTPException) else e))
  kind = "invalid_request_error" if status < 500 else "server_error"
  return {"detail": message, "error": {"message": message, "type": kind, "code": status}}


class BodyLimit:
  """Refuse a request body over `limit` bytes (413) before anything parses it: by its
  Content-Length, or as its chunks arrive."""

  def __init__(self, app, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None:
      if not declared.isdigit():
        return await JSONResponse({"detail": "Content-Length is not a number"}, 400)(
            scope, receive, send)
      if int(declared) > self.limit:
        return await JSONResponse({"detail": f"the body is over {self.limit:,} bytes"}, 413)(
            scope, receive, send)
    seen = 0

    async def limited():
      nonlocal seen
      message = await receive()
      seen += len(message.get("body", b""))
      if seen > self.limit:   # FastAPI lets an HTTPException from the body through as it is
        raise HTTPException(413, f"the body is over {self.limit:,} bytes")
      return message

    await self.app(scope, limited, send)


class _JobStream(StreamingResponse):
  """A streamed completion that tells its job when the client has gone (so its rows stop at
  the next chunk), whether it hung up mid-stream or while the job waited."""

  def __init__(self, job: worker_lib.Job, content):
    super().__init__(content, media_type="text/event-stream")
    self.job = job

  async def __call__(self, scope, receive, send):
    async def watch():
      while (await receive())["type"] != "http.disconnect":
        pass
      self.job.cancelled = True

    watcher = asyncio.ensure_future(watch())
    try:
      await super().__call__(scope, receive, send)
    finally:
      self.job.cancelled = True   # done or gone: nothing more is decoded for it
      watcher.cancel()


def create_app(run_dir: str, token: str | None = None, limits: Limits = Limits(),
               policy: str | None = None) -> FastAPI:
  """The server of a run: completions (the worker thread decodes them), the tokenizer, the
  sources and their ledger, health; each group of routes built apart below."""
  if token is not None:
    _check_token(token, "the admin token")
  worker = worker_lib.Worker(run_dir, policy, limits)
  server = worker.server   # read-only here (tokenizer, config); the worker thread runs it
  board = switchboard.Switchboard(run_dir)   # the routes' connection (thread-safe)
  name = run_dir.rstrip("/").rsplit("/", 1)[-1]
  app = FastAPI(title="sinkformer", summary=f"run {run_dir}, step {server.step}")
  app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
  app.router.on_shutdown += [worker.stop, board.close]
  _error_handlers(app)
  app.include_router(_completions(worker, board, name, limits))
  app.include_router(_models(run_dir, server, name))
  app.include_router(_tokenizer(server))
  app.include_router(_sources(board, server, token))

  @app.get("/healthz")
  def health():
    return {"status": "ok", "run": run_dir, "step": server.step, "policy": server.policy,
            "sources": board.counts(), "ledger_seq": board.ledger_seq(),
            "in_force_seq": server.seq, "queued": worker.queued(), "worker": dict(worker.stats)}

  return app


def _error_handlers(app: FastAPI):
  """Every error as OpenAI clients read it ({"error": {...}}, with FastAPI's "detail")."""

  @app.exception_handler(UserError)
  async def user_error(_, e: UserError):
    return JSONResponse(_error_body(e), status_code=_status(e))

  @app.exception_handler(StarletteHTTPException)   # ours and the router's (404, 405)
  async def http_error(_, e: StarletteHTTPException):
    return JSONResponse(_error_body(e, e.status_code), status_code=e.status_code,
                        headers=e.headers)

  @app.exception_handler(RequestValidationError)
  async def invalid(_, e: RequestValidationError):
    errors = [{"loc": list(err["loc"]), "msg": _excerpt(err["msg"]), "type": err["type"]}
              for err in e.errors()[:10]]
    message = "; ".join(f"{'.'.join(map(str, x['loc'][1:]))}: {x['msg']}" for x in errors)
    return JSONResponse({"detail": errors, "error": {
        "message": message, "type": "invalid_request_error", "code": 422}}, 422)

  @app.exception_handler(Exception)
  async def bug(_, e: Exception):
    traceback.print_exception(e, file=sys.stderr)
    return JSONResponse(_error_body(e), status_code=500)



def _completions(worker: worker_lib.Worker, board, name: str, limits: Limits) -> APIRouter:
  """POST /v1/completions: validated and tokenized here, decoded by the worker thread."""
  router, server = APIRouter(), worker.server

  def named(mode: str) -> int:   # the source a mode names, resolved before the batch
    try:
      return serving.named_source(board, mode)
    except UserError as e:   # the same error (and status), naming the field
      e.args = (f"mode: {e}",)
      raise

  def mode_of(body: Completion) -> str:
    """The request's mode: `mode`, else the one its `model` names (NAME@MODE), else route."""
    model, _, suffix = (body.model or name).partition("@")
    if model != name:
      raise HTTPException(404, f"model: {_excerpt(body.model)!r} is not served here; GET "
                               f"/v1/models lists {name} and {name}@MODE")
    return body.mode or suffix or "route"

  def tokens_of(body: Completion) -> tuple[list[list[int]], list[str]]:
    """(each prompt's tokens with BOS first, its text), refused if empty or too long."""
    p = body.prompt
    ids = [p] if p and isinstance(p[0], int) else p if p and isinstance(p[0], list) else None
    texts = None if ids is not None else [p] if isinstance(p, str) else p
    count = len(ids if ids is not None else texts)
    if not 1 <= count <= limits.max_prompts:
      raise HTTPException(400, f"prompt: 1 to {limits.max_prompts} prompts per request, got "
                               f"{count}")
    if texts is not None:
      longest = max(map(len, texts))
      if longest > limits.max_prompt_tokens * CHARS_PER_TOKEN:
        raise HTTPException(400, f"prompt: at most {limits.max_prompt_tokens} tokens per "
                                 f"prompt; this one has {longest:,} characters")
      ids = [server.tokenizer.encode(t) for t in texts]
    vocab = server.tokenizer.vocab_size
    for x in ids:
      if not x:
        raise HTTPException(400, "prompt: empty; give at least one token")
      if max(x) >= vocab:
        raise HTTPException(400, f"prompt: token id {max(x)} is outside the vocabulary "
                                 f"(0..{vocab - 1})")
    longest = max(len(x) for x in ids)
    if longest > limits.max_prompt_tokens:
      raise HTTPException(400, f"prompt: at most {limits.max_prompt_tokens} tokens per prompt, "
                               f"got {longest}")
    server.check_fits(longest)   # UserError: 400
    return ([[server.tokenizer.bos, *x] for x in ids],
            texts or [server.tokenizer.decode(x) for x in ids])

  @router.post("/v1/completions")
  async def completions(body: Completion, request: Request):
    if body.max_tokens > limits.max_tokens:
      raise HTTPException(400, f"max_tokens: at most {limits.max_tokens}, got {body.max_tokens}")
    if body.max_tokens == 0 and not body.echo:
      raise HTTPException(400, "max_tokens: 0 only scores the prompt, which needs echo: true")
    if body.stream and (body.echo or body.logprobs is not None):
      raise HTTPException(400, "stream: echo and logprobs come with whole responses only")
    mode = mode_of(body)
    prompts, texts = await run_in_threadpool(tokens_of, body)
    job = worker_lib.Job(prompts, texts, body, mode, await run_in_threadpool(named, mode),
                         asyncio.get_running_loop(), asyncio.Queue())
    try:
      worker.submit(job)
    except queue.Full:
      raise HTTPException(429, f"the server has {limits.max_queue} requests waiting; try "
                               "again shortly", headers={"Retry-After": "1"}) from None
    meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
            "created": int(time.time()), "model": body.model or name}
    if body.stream:
      return _JobStream(job, _stream(job, meta))
    try:
      while True:
        try:
          kind, payload = await asyncio.wait_for(job.events.get(), 0.5)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            return JSONResponse({"detail": "client gone"}, 499)
          continue
        if kind == "error":
          return JSONResponse(_error_body(payload), status_code=_status(payload))
        if kind == "done":
          prompt_tokens = sum(len(p) - 1 for p in prompts)
          completion_tokens = sum(c["tokens"] for c in payload)
          return {**meta, "choices": payload, "policy": server.policy,
                  "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens},
                  "sent_at": time.time()}
    finally:
      job.cancelled = True   # answered, or its client is gone: nothing more is decoded

  async def _stream(job: worker_lib.Job, meta: dict):
    while True:
      kind, payload = await job.events.get()
      if kind == "error":
        error = {"message": _error_body(payload)["detail"], "status": _status(payload)}
        yield f"data: {json.dumps({'error': error})}\n\n"
        return
      if kind == "chunk":   # sent_at: when it left, to compare with an unlearn's return
        yield f"data: {json.dumps({**meta, 'choices': payload, 'sent_at': time.time()})}\n\n"
      else:   # the last chunk: no new text (an empty one, as clients join them)
        done = [{"text": "", **{k: c[k] for k in ("index", "finish_reason", "mode", "source",
                                                  "policy")}} for c in payload]
        yield f"data: {json.dumps({**meta, 'choices': done, 'sent_at': time.time()})}\n\n"
        yield "data: [DONE]\n\n"
        return

  return router


def _models(run_dir: str, server, name: str) -> APIRouter:
  """GET /v1/models: the run, and the run in each of its modes."""
  router = APIRouter()
  modes = ("route", "backbone", "placebo") if server.setup.spec is not None else ("dense",)

  @router.get("/v1/models")
  def models():
    created = int(os.path.getmtime(os.path.join(run_dir, "config.json")))
    return {"object": "list", "data": [
        {"id": model, "object": "model", "created": created, "owned_by": "sinkformer",
         "step": server.step, "policy": server.policy}
        for model in [name] + [f"{name}@{m}" for m in modes if m != "dense"]]}

  return router


def _tokenizer(server) -> APIRouter:
  """What lm-eval and OpenAI-style clients ask of a tokenizer."""
  router = APIRouter()
  context = server.cfg.data.seq_len

  @router.get("/tokenizer_info")
  def tokenizer_info():
    tok = server.tokenizer
    return {"eos_token": tok.piece(tok.eos), "bos_token": tok.piece(tok.bos),
            "pad_token": tok.piece(0), "vocab_size": tok.vocab_size,
            "model_max_length": context, "add_bos_token": True}

  @router.post("/tokenize")
  def tokenize(body: Tokenize):
    tok = server.tokenizer
    special = {tok.piece(tok.bos): tok.bos, tok.piece(tok.eos): tok.eos}
    tokens = [special[body.prompt]] if body.prompt in special else tok.encode(body.prompt)
    tokens = ([tok.bos] if body.add_special_tokens else []) + tokens
    return {"tokens": tokens, "count": len(tokens), "max_model_len": context}

  @router.post("/detokenize")
  def detokenize(body: Detokenize):
    if body.tokens and max(body.tokens) >= server.tokenizer.vocab_size:
      raise HTTPException(400, f"tokens: ids must be below {server.tokenizer.vocab_size}")
    return {"prompt": server.tokenizer.decode(body.tokens)}

  return router


def _sources(board, server, token: str | None) -> APIRouter:
  """Source lookups, and unlearning/reactivating behind the admin token."""
  router = APIRouter()

  def admin(authorization: str | None = Header(None)):
    if token is None:
      raise HTTPException(403, "unlearning over HTTP is off: start the server with "
                               f"--token-file FILE or {TOKEN_ENV} set")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
      raise HTTPException(401, "a valid 'Authorization: Bearer TOKEN' header is required",
                          headers={"WWW-Authenticate": "Bearer"})

  @router.get("/v1/sources/{ref:path}")
  def source(ref: str):
    rows = board.resolve([ref], all_matching=True)
    return {"sources": [{**r, "ledger": board.ledger(r["id"])} for r in rows[:1000]]}

  @router.get("/v1/sources")
  def sources(status: Literal["active", "unlearned"] | None = None,
              offset: int = Query(0, ge=0, le=catalog.MAX_ID),
              limit: int = Query(50, ge=1, le=1000)):
    return {"counts": board.counts(), "sources": board.page(status, offset, limit)}

  def change(action: str, body: Change):
    if action == "unlearn":
      got = board.unlearn(body.sources, body.reason, body.who or "http", body.all_matching)
    else:
      got = board.reactivate(body.sources, body.reason, body.who or "http",
                             allowed=server.cfg.unlearn.allow_reactivation,
                             all_matching=body.all_matching)
    # committed either way; 202 says a live server has not confirmed it yet
    return JSONResponse(got, 202 if got["in_force"]["late"] else 200)

  @router.post("/v1/unlearn", dependencies=[Depends(admin)])
  def unlearn(body: Change):
    return change("unlearn", body)

  @router.post("/v1/reactivate", dependencies=[Depends(admin)])
  def reactivate(body: Change):
    return change("reactivate", body)

  return router
