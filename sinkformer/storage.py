"""Where files live: local paths or object stores (gs://, s3://: anything etils.epath opens).

Corpora are read through `path()`. Libraries that need a local file (SQLite, ArrayRecord's
reader, SentencePiece) work on local copies:
  - prepared data in a bucket is downloaded once into the cache (`local_prepared`), keyed by
    its manifest; `data prepare --out gs://...` prepares in the cache and `publish`es the
    files with manifest.json last, so readers see a complete dataset or none;
  - a run directory in a bucket is worked on through a local mirror (`run_dir`): its files
    are pulled on entry and pushed back on `push` and on exit, while checkpoints go straight
    to the bucket through Orbax (`checkpoints_of`).
The cache is $SINKFORMER_CACHE, else ~/.cache/sinkformer. Every remote path is probed first
(`check`): without credentials or network it fails in seconds with one line naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading

from etils import epath

from sinkformer.errors import UserError

REMOTE_MARK = ".remote"   # in a mirror: the URI of the run directory it mirrors
LOCAL_ONLY = ("checkpoints", REMOTE_MARK, "servers")   # never mirrored (servers: live processes)
PROBE_SECONDS = 10.0


def is_remote(p) -> bool:
  return "://" in os.fspath(p)


def path(p) -> epath.Path:
  """`p` as an epath.Path (remote URIs checked first)."""
  if is_remote(p):
    check(p)
  return epath.Path(p)


def cache_root() -> str:
  return os.environ.get("SINKFORMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "sinkformer")


def _slot(kind: str, uri: str) -> str:
  """A cache directory of its own for a remote URI."""
  name = uri.rstrip("/").rsplit("/", 1)[-1]
  return os.path.join(cache_root(), kind, f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}")


_checked: set[str] = set()


def check(p, timeout: float = PROBE_SECONDS):
  """Fail fast, in one line, if the store behind remote path `p` cannot be reached or read:
  object-store clients retry for minutes or fall back to anonymous access by themselves."""
  uri = os.fspath(p)
  bucket = uri.split("://", 1)[0] + "://" + uri.split("://", 1)[1].split("/", 1)[0]
  if bucket in _checked:
    return
  outcome: list = []

  def probe():
    try:
      epath.Path(bucket).exists()
      outcome.append(None)
    except BaseException as e:   # reported below, on the caller's thread
      outcome.append(e)

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  if not outcome:
    raise UserError(f"{uri}: no answer from {bucket} in {timeout:.0f}s (no network, or no "
                    "credentials: for gs:// run 'gcloud auth application-default login' or set "
                    "GOOGLE_APPLICATION_CREDENTIALS)")
  if outcome[0] is not None:
    e = outcome[0]
    hint = (" (pip install gcsfs)" if isinstance(e, ImportError) else
            " (check the credentials: GOOGLE_APPLICATION_CREDENTIALS or 'gcloud auth "
            "application-default login')" if isinstance(e, PermissionError) else "")
    raise UserError(f"{uri}: cannot reach {bucket}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}{hint}")
  _checked.add(bucket)


def files(root) -> list[epath.Path]:
  """Every file below `root`, in name order (epath's rglob refuses remote paths)."""
  out = []
  for entry in sorted(epath.Path(root).iterdir()):
    out += files(entry) if entry.is_dir() else [entry]
  return out


def _copy_tree(src: epath.Path, dst: epath.Path, skip=(), last: str | None = None):
  """Copy the files below `src` to `dst` (not those under a `skip` name); `last` after all."""
  files_ = [f for f in files(src) if not any(part in skip for part in f.relative_to(src).parts)]
  files_.sort(key=lambda f: f.name == last)
  for f in files_:
    target = dst / f.relative_to(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(f.read_bytes())


def publish(local_dir: str, uri: str, last: str):
  """Upload a finished local directory to `uri`, the file `last` (the marker readers look
  for) after every other, so a reader sees all of it or none."""
  path(uri).mkdir(parents=True, exist_ok=True)
  _copy_tree(epath.Path(local_dir), epath.Path(uri), last=last)


def staging(uri: str) -> str:
  """The local directory where output bound for remote `uri` is made first."""
  return _slot("staging", uri)


def local_prepared(uri: str) -> str:
  """A local copy of prepared data at `uri` (downloaded once; refreshed when its manifest
  changes). A local path is returned as it is."""
  if not is_remote(uri):
    return uri
  remote = path(uri)
  try:
    manifest = (remote / "manifest.json").read_text()
  except FileNotFoundError:
    raise UserError(f"{uri} is not prepared data (no manifest.json); run 'sinkformer data "
                    f"prepare --corpus ... --out {uri}'") from None
  local = _slot("prepared", uri)
  mark = os.path.join(local, "manifest.json")
  if os.path.exists(mark) and open(mark).read() == manifest:
    return local
  shutil.rmtree(local, ignore_errors=True)
  tmp = f"{local}.partial-{os.getpid()}"   # processes of one host may download at once
  _copy_tree(remote, epath.Path(tmp), last="manifest.json")
  keep_as_cache(tmp, uri)
  return local


def keep_as_cache(local_dir: str, uri: str):
  """Make a finished local copy of prepared data `uri` its cached copy (moved there)."""
  target = _slot("prepared", uri)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  try:
    os.replace(local_dir, target)
  except OSError:   # another process put one there first: the same files
    shutil.rmtree(local_dir, ignore_errors=True)


def checkpoints_of(run_dir: str) -> str:
  """Where a run's checkpoints are: in its bucket if `run_dir` is a mirror."""
  mirror = _mirror(run_dir)
  if mirror:
    return mirror["uri"].rstrip("/") + "/checkpoints"
  return os.path.join(run_dir, "checkpoints")


def _mirror(run_dir: str) -> dict | None:
  try:
    with open(os.path.join(run_dir, REMOTE_MARK)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _files(root: epath.Path) -> dict[str, epath.Path]:
  """A run directory's files by relative path, less checkpoints, live servers' entries and
  SQLite's side files."""
  out = {}
  for entry in root.iterdir():
    if entry.name in LOCAL_ONLY or entry.name.endswith(("-wal", "-shm", ".tmp")):
      continue
    for f in files(entry) if entry.is_dir() else [entry]:
      out[f.relative_to(root).as_posix()] = f
  return out


def _contents(f: epath.Path) -> bytes:
  """A file's bytes; a SQLite database's through its backup API (committed pages that are
  still in its write-ahead log included)."""
  if f.name.endswith(".sqlite") and not is_remote(f):
    import tempfile
    from sinkformer.data import catalog
    with tempfile.TemporaryDirectory() as tmp:
      snap = os.path.join(tmp, "snapshot.sqlite")
      src, dst = catalog.connect(os.fspath(f), "ro"), catalog.connect(snap, "rwc")
      src.backup(dst)
      src.close()
      dst.close()
      with open(snap, "rb") as g:
        return g.read()
  return f.read_bytes()


def _digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _save_mirror(run_dir: str, mirror: dict):
  with open(os.path.join(run_dir, REMOTE_MARK + ".tmp"), "w") as f:
    json.dump(mirror, f)
  os.replace(os.path.join(run_dir, REMOTE_MARK + ".tmp"), os.path.join(run_dir, REMOTE_MARK))


def pull(uri: str) -> str:
  """The local mirror of remote run directory `uri`, with its files (not checkpoints).

  Other processes of this host may be using the mirror: a database is replaced through
  SQLite (its backup API, under its locks), never by writing over the file; an append-only
  file (the ledger journal) is only ever extended, and a local one that is already longer
  (changes not yet pushed) is kept; the switchboard then brings its database up to it."""
  local = _slot("runs", uri)
  remote = path(uri)
  os.makedirs(local, exist_ok=True)
  synced = {}
  if remote.exists():
    for rel, f in _files(remote).items():
      data = f.read_bytes()
      target = os.path.join(local, rel)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if rel.endswith(".jsonl") and os.path.exists(target):
        _extend(target, data, f)
      elif rel.endswith(".sqlite") and os.path.exists(target):
        _restore(target, data)
      else:
        with open(target, "wb") as g:
          g.write(data)
      synced[rel] = _digest(data)
  _save_mirror(local, {"uri": uri, "synced": synced})
  return local


def _extend(target: str, data: bytes, origin):
  """Bring an append-only file up to `data` (`origin`'s bytes), keeping what it has beyond."""
  with open(target, "rb") as g:
    mine = g.read()
  if mine.startswith(data):
    return
  if not data.startswith(mine):
    raise UserError(f"{target} and {origin} have diverged (two hosts appended to the run's "
                    "ledger); merge them by hand before going on")
  with open(target, "ab") as g:
    g.write(data[len(mine):])


def _restore(target: str, data: bytes):
  """Replace the database at `target` with `data`, through SQLite."""
  import sqlite3
  import tempfile
  from sinkformer.data import catalog
  with tempfile.TemporaryDirectory() as tmp:
    snap = os.path.join(tmp, "snapshot.sqlite")
    with open(snap, "wb") as g:
      g.write(data)
    src, dst = catalog.connect(snap, "ro"), catalog.connect(target, "rw")
    try:
      src.backup(dst)
    except sqlite3.DatabaseError as e:
      raise UserError(f"{target}: cannot take the bucket's copy ({e})") from None
    finally:
      src.close()
      dst.close()


def push(run_dir: str):
  """Upload what changed in a mirror to its bucket (nothing for a local run directory).
  A file that also changed in the bucket since it was pulled (another host wrote it) is
  not overwritten: that is an error naming it."""
  mirror = _mirror(run_dir)
  if mirror is None:
    return
  remote = epath.Path(mirror["uri"])
  for rel, f in sorted(_files(epath.Path(run_dir)).items()):
    data = _contents(f)
    digest = _digest(data)
    if mirror["synced"].get(rel) == digest:
      continue
    target = remote / rel
    if target.exists() and _digest(target.read_bytes()) != mirror["synced"].get(rel):
      raise UserError(f"{target} changed in the bucket since this process pulled it (another "
                      f"host wrote it); this change was not uploaded: run the command again")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    mirror["synced"][rel] = digest
    _save_mirror(run_dir, mirror)


@contextlib.contextmanager
def run_dir(p: str, write: bool = True):
  """A run directory to work in locally: `p` itself, or the mirror of a remote `p`, pushed
  back on exit (if `write`) whether or not the work succeeded."""
  if not is_remote(p):
    yield p
    return
  local = pull(p)
  try:
    yield local
  finally:
    if write:
      push(local)
