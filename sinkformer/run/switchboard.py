"""The switchboard: which sources of a run are unlearned, and the ledger of every change.

It lives in the run directory as two copies that can each rebuild the other:
  sources.sqlite  a copy of the source catalog made when the run starts, whose `status`
                  column is the switch (active / unlearned), plus the `ledger` table (seq,
                  request id, action, source, who, why, when; triggers reject UPDATE and
                  DELETE);
  ledger.jsonl    the same ledger, append-only and hash-chained (journal.py), written and
                  fsynced before each change commits.
A request is one transaction: all of its sources change, or none. Unlearning is idempotent;
reactivation is a separate action that the run must allow. When `unlearn` returns, the
change is committed, on disk twice, and in force in every live server of the run
(presence.py), whichever process asked for it.

The database file is only ever opened through SQLite (catalog.connect). A missing, empty or
damaged switchboard is an error that says how to recover (`rebuild`: the run's catalog plus
every change either copy still holds); nothing is ever made over an existing file. One
Switchboard may be shared by threads: a lock serialises their use of its connection.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import itertools
import os
import sqlite3
import threading
import time
import uuid

from sinkformer import storage
from sinkformer.data import catalog as catalog_lib
from sinkformer.errors import UserError
from sinkformer.run import journal, presence

FILE = "sources.sqlite"
WAIT_S = 30.0   # how long an unlearn waits for live servers to put it in force
LEDGER = """
CREATE TABLE IF NOT EXISTS ledger (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  request_id TEXT NOT NULL,
  action TEXT NOT NULL CHECK (action IN ('unlearn', 'reactivate')),
  source_id INTEGER NOT NULL,
  who TEXT NOT NULL,
  why TEXT NOT NULL,
  at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ledger_request ON ledger(request_id);
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
  BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
  BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE INDEX IF NOT EXISTS sources_status ON sources(status);
"""
COLUMNS = "seq, request_id, action, source_id, who, why, at"


class Refused(UserError):
  """A request for an unlearned source (by any name): never served."""


class Damaged(UserError):
  """The switchboard cannot be read as it is; the message says how to recover."""


class Busy(UserError):
  """Another process held the switchboard's write lock for longer than the busy timeout."""


def recovery(run_dir: str) -> str:
  return (f"run 'sinkformer sources rebuild --run {run_dir}' (it restores the switchboard "
          f"from the run's catalog and every change {FILE} or {journal.FILE} still holds)")


def create(run_dir: str, catalog_path: str | None = None, sources=()) -> str:
  """The run's switchboard, made once: a copy of `catalog_path`, or (built-in corpus,
  mixtures) a new catalog of `sources` = [(id, key, title, group, documents, tokens)].
  An existing one is never touched; a missing one beside a ledger journal is damage."""
  path = os.path.join(run_dir, FILE)
  if os.path.exists(path):
    return path
  if journal.read(os.path.join(run_dir, journal.FILE)).last:
    raise Damaged(f"{path} is missing but the run has unlearned before: {recovery(run_dir)}")
  journal.create(os.path.join(run_dir, journal.FILE))
  _build(path, catalog_path, sources, [])
  return path


def _build(path: str, catalog_path: str | None, sources, entries: list[journal.Entry]):
  """A new switchboard at `path`, made beside it and renamed into place: the catalog, the
  ledger, `entries` replayed."""
  tmp = path + ".tmp"
  for leftover in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):   # a killed build's
    if os.path.exists(leftover):
      os.remove(leftover)
  if catalog_path:
    src = catalog_lib.connect(catalog_path, "ro")
    db = catalog_lib.connect(tmp, "rwc")
    src.backup(db)
    src.close()
  else:
    cat = catalog_lib.Catalog(tmp, create=True)
    with cat.batch():
      cat.db.executemany(
          "INSERT INTO sources (id, key, title, title_norm, grp, documents, tokens) "
          "VALUES (?,?,?,?,?,?,?)",
          [(i, k, t, catalog_lib.normalize(t), g, n, m) for i, k, t, g, n, m in sources])
    db = cat.db
  db.executescript(LEDGER)
  db.execute("BEGIN")
  _apply(db, entries)
  db.execute("COMMIT")
  db.close()   # the last connection: the write-ahead log is folded into the file
  os.replace(tmp, path)
  journal.sync_dir(os.path.dirname(os.path.abspath(path)))


def _apply(db: sqlite3.Connection, entries: list[journal.Entry]):
  """Write `entries` into the ledger table (their own numbers) and flip their sources."""
  for e in entries:
    db.executemany(f"INSERT INTO ledger ({COLUMNS}) VALUES (?,?,?,?,?,?,?)", e.rows())
    status = "unlearned" if e.action == "unlearn" else "active"
    db.executemany("UPDATE sources SET status = ? WHERE id = ?", ((status, s) for s in e.sources))


def _requests(rows) -> list[tuple]:
  """Ledger rows (seq order) grouped into requests: (request_id, action, sources, who, why, at)."""
  out = []
  for (request, action, who, why, at), group in itertools.groupby(
      rows, key=lambda r: (r[1], r[2], r[4], r[5], r[6])):
    out.append((request, action, [r[3] for r in group], who, why, at))
  return out


class Switchboard:

  def __init__(self, run_dir: str):
    self.run_dir = run_dir
    self.path = os.path.join(run_dir, FILE)
    self.journal = os.path.join(run_dir, journal.FILE)
    if not os.path.exists(self.path):
      if os.path.exists(self.journal):
        raise Damaged(f"{self.path} is missing: {recovery(run_dir)}")
      raise UserError(f"{run_dir} has no switchboard ({FILE}): is it a sinkformer run "
                      "directory that has started training?")
    self._lock = threading.RLock()
    self._version, self._writes = None, 0
    try:
      self.catalog = catalog_lib.Catalog(self.path)
    except UserError as e:
      raise Damaged(f"{e}: {recovery(run_dir)}") from None
    self.db = self.catalog.db
    with self._guard():
      self.db.execute("PRAGMA busy_timeout = 10000")   # several processes may write
      self.db.execute("PRAGMA synchronous = FULL")     # a commit is on disk when it returns
      if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'ledger'").fetchone():
        raise Damaged(f"{self.path} has no ledger: {recovery(run_dir)}")
      journal.create(self.journal)   # a run from before the journal: made from the database
      if journal.read(self.journal, self.ledger_seq()).last != self.ledger_seq():
        self._write(lambda tail: None)   # the copies disagree: bring them together now

  def close(self):
    with self._lock:
      self.catalog.close()

  @contextlib.contextmanager
  def _guard(self):
    """One thread at a time on the connection; SQLite's failures as errors a user can act on."""
    with self._lock:
      try:
        yield
      except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
        raise
      except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
          raise Busy(f"{self.path} is busy: another process held its write lock for more "
                     "than 10 s; nothing was changed, try again") from None
        if "full" in str(e):
          raise UserError(f"{self.path}: the disk is full; nothing was changed") from None
        raise Damaged(f"{self.path}: {e}: {recovery(self.run_dir)}") from None
      except sqlite3.DatabaseError as e:
        raise Damaged(f"{self.path} is damaged ({e}): {recovery(self.run_dir)}") from None

  def _write(self, change):
    """Run `change(tail)` in one write transaction, after bringing the journal and the
    database together (a journal line the database lacks is rolled forward; database
    entries the journal lacks are appended to it). `tail`: the journal's end."""
    with self._guard():
      self.db.execute("BEGIN IMMEDIATE")   # one writer, across processes
      try:
        last = self.ledger_seq()
        tail = journal.read(self.journal, last)
        if tail.last > last:
          if tail.entries[0].seq != last + 1:
            raise Damaged(f"{self.journal} and {self.path} disagree at ledger entry {last}: "
                          f"{recovery(self.run_dir)}")
          _apply(self.db, tail.entries)
        elif tail.last < last:
          rows = self.db.execute(f"SELECT {COLUMNS} FROM ledger WHERE seq > ? ORDER BY seq",
                                 (tail.last,)).fetchall()
          entries, prev = [], tail.tip
          for request, action, sources, who, why, at in _requests(rows):
            seq = entries[-1].last + 1 if entries else tail.last + 1
            entries.append(journal.make(seq, request, action, sources, who, why, at, prev))
            prev = entries[-1].sha256
          journal.append(self.journal, entries, tail)
        out = change(tail)
        self.db.execute("COMMIT")
        self._writes += 1
        return out
      except BaseException:
        if self.db.in_transaction:
          self.db.execute("ROLLBACK")
        raise

  def resolve(self, refs, all_matching: bool = False) -> list[dict]:
    """Sources named by id, key, title (any spelling) or `group:` (all its sources); unknown
    names are one error listing them, and a name that could mean several sources is refused
    with the candidates (catalog.Ambiguous) unless `all_matching`."""
    with self._guard():
      return self.catalog.resolve(refs, all_matching)

  def active(self, ref, use: str = "served") -> dict:
    """The one source `ref` names, if it may be `use`d (served, exported, ...); a Refused
    error if it was unlearned. A reference to several sources (a group, a shared title) is
    refused too: a mode serves one source."""
    rows = self.resolve([ref])
    gone = [r for r in rows if r["status"] != "active"]
    if gone:
      raise Refused(f"source {ref!r} has been unlearned (request "
                    f"{self.last_request(gone[0]['id'])}); it cannot be {use}")
    if len(rows) > 1:
      raise UserError(f"{ref!r} names {len(rows)} sources; a mode serves one (name it by id:N "
                      "or key:K)")
    return rows[0]

  def last_request(self, source_id: int) -> str | None:
    with self._guard():
      row = self.db.execute("SELECT request_id FROM ledger WHERE source_id = ? ORDER BY seq "
                            "DESC LIMIT 1", (source_id,)).fetchone()
    return row[0] if row else None

  def _change(self, refs, action: str, why: str, who: str | None, all_matching: bool,
              wait_s: float) -> dict:
    to, frm = ("unlearned", "active") if action == "unlearn" else ("active", "unlearned")
    request = uuid.uuid4().hex[:16]
    who = who or getpass.getuser()
    at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")

    def change(tail):
      rows = self.catalog.resolve(refs, all_matching)
      changing = [r["id"] for r in rows if r["status"] == frm]
      if changing:   # on disk in the journal before the database commits it
        entry = journal.make(self.ledger_seq() + 1, request, action, changing, who, why, at,
                             tail.tip)
        journal.append(self.journal, [entry], tail)
        _apply(self.db, [entry])
      return rows, changing, self.ledger_seq()

    # `seq` covers an earlier request for the same sources that servers may not have yet
    rows, changing, seq = self._write(change)
    if changing:
      storage.push(self.run_dir)   # a run in a bucket: the change reaches it now
    in_force = presence.wait(self.run_dir, seq, wait_s)
    return {"request_id": request if changing else None, "action": action,
            "changed": changing, "unchanged": [r["id"] for r in rows if r["status"] != frm],
            "ledger_seq": seq, "in_force": in_force, "returned_at": time.time()}

  def unlearn(self, refs, why: str, who: str | None = None, all_matching: bool = False,
              wait_s: float = WAIT_S) -> dict:
    """Unlearn the sources `refs` name, as one ledgered request. Returns once the change is
    committed and every live server of the run has it in force (or `wait_s` passed:
    `in_force["late"]` names the servers that did not confirm)."""
    return self._change(refs, "unlearn", why, who, all_matching, wait_s)

  def reactivate(self, refs, why: str, who: str | None = None, allowed: bool = False,
                 all_matching: bool = False, wait_s: float = WAIT_S) -> dict:
    if not allowed:
      raise Refused("reactivating unlearned sources is off for this run (config "
                    "unlearn.allow_reactivation = False)")
    return self._change(refs, "reactivate", why, who, all_matching, wait_s)

  def changed(self) -> bool:
    """Whether anything was committed since the last call, by this connection or any other
    (any process): SQLite's data_version, read from the shared-memory index, costs no disk
    read."""
    with self._guard():
      version = (self.db.execute("PRAGMA data_version").fetchone()[0], self._writes)
    changed, self._version = version != self._version, version
    return changed

  def events_since(self, seq: int) -> tuple[list[tuple[str, int]], int]:
    """([(action, source id)], newest seq) of ledger rows after `seq`."""
    with self._guard():
      rows = self.db.execute("SELECT seq, action, source_id FROM ledger WHERE seq > ? "
                             "ORDER BY seq", (seq,)).fetchall()
    return [(a, s) for _, a, s in rows], (rows[-1][0] if rows else seq)

  def ledger_seq(self) -> int:
    """The newest ledger entry's number (0: none yet)."""
    with self._guard():
      return self.db.execute("SELECT coalesce(max(seq), 0) FROM ledger").fetchone()[0]

  def unlearned_ids(self) -> list[int]:
    with self._guard():
      return [r[0] for r in self.db.execute("SELECT id FROM sources WHERE status = 'unlearned'")]

  def ledger(self, source_id: int | None = None) -> list[dict]:
    where, args = ("WHERE source_id = ?", (source_id,)) if source_id is not None else ("", ())
    with self._guard():
      return [dict(zip(COLUMNS.split(", "), r)) for r in self.db.execute(
          f"SELECT {COLUMNS} FROM ledger {where} ORDER BY seq", args)]

  def search(self, text: str, limit: int = 20) -> list[dict]:
    """Sources whose title contains `text` (case-insensitive), active and unlearned."""
    with self._guard():
      rows = self.db.execute(f"SELECT {catalog_lib.COLUMNS} FROM sources "
                             "WHERE title_norm LIKE ? ESCAPE '\\' ORDER BY id LIMIT ?",
                             (f"%{_like_escaped(catalog_lib.normalize(text))}%",
                              _bounded("limit", limit))).fetchall()
    return [catalog_lib.row_dict(r) for r in rows]

  def page(self, status: str | None, offset: int, limit: int) -> list[dict]:
    where, args = ("WHERE status = ?", (status,)) if status else ("", ())
    with self._guard():
      rows = self.db.execute(f"SELECT {catalog_lib.COLUMNS} FROM sources {where} ORDER BY id "
                             "LIMIT ? OFFSET ?", (*args, _bounded("limit", limit),
                                                  _bounded("offset", offset))).fetchall()
    return [catalog_lib.row_dict(r) for r in rows]

  def counts(self) -> dict:
    with self._guard():
      return dict(self.db.execute("SELECT status, count(*) FROM sources GROUP BY status"))


def _bounded(name: str, value: int) -> int:
  if not 0 <= value <= 2**63 - 1:
    raise UserError(f"{name} must be from 0 to {2**63 - 1}, got {value}")
  return value


def _like_escaped(text: str) -> str:
  """`text` matched literally inside a LIKE pattern (its % and _ are not wildcards)."""
  return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def copy(run_dir: str, to_dir: str):
  """The run's switchboard (both copies) into another directory, through SQLite's backup
  API (committed pages still in the write-ahead log included)."""
  if os.path.exists(os.path.join(to_dir, FILE)):
    raise UserError(f"{to_dir} has a switchboard already")
  board = Switchboard(run_dir)
  dst = catalog_lib.connect(os.path.join(to_dir, FILE), "rwc")
  with board._guard():
    board.db.backup(dst)
  dst.close()
  board.close()
  with open(board.journal, "rb") as f, open(os.path.join(to_dir, journal.FILE), "xb") as g:
    g.write(f.read())


def verify(run_dir: str) -> list[str]:
  """What is wrong with the run's switchboard ([]: nothing): the database's integrity
  (SQLite's quick_check), the journal's every line and chain, and whether both hold the
  same ledger."""
  path, jpath = os.path.join(run_dir, FILE), os.path.join(run_dir, journal.FILE)
  problems = []
  try:
    full = journal.read(jpath)
  except journal.Damaged as e:
    problems.append(str(e))
    full = None
  if not os.path.exists(jpath):
    problems.append(f"{jpath} is missing (a run from before it, or deleted; opening the "
                    "switchboard writes it again from the database)")
  if not os.path.exists(path):
    return problems + [f"{path} is missing"]
  try:
    db = catalog_lib.connect(path, "ro")
    try:
      check = [r[0] for r in db.execute("PRAGMA quick_check")]
      if check != ["ok"]:
        problems.append(f"{path}: " + "; ".join(check[:5]))
      rows = db.execute(f"SELECT {COLUMNS} FROM ledger ORDER BY seq").fetchall()
    finally:
      db.close()
  except sqlite3.DatabaseError as e:
    return problems + [f"{path}: {e}"]
  if full is not None:
    kept = [(e.request_id, e.action, list(e.sources)) for e in full.entries]
    held = [(r, a, s) for r, a, s, *_ in _requests(rows)]
    if kept != held:
      problems.append(f"{jpath} holds {len(kept)} requests and the database {len(held)}; "
                      "they differ (the next change brings them together, or rebuild)")
  return problems


def rebuild(run_dir: str, catalog_path: str | None, sources=()) -> dict:
  """A new switchboard from the run's catalog (`catalog_path` or `sources`, as `create`
  takes them) with every request that either copy still holds, replayed in order. The old
  files are kept beside it (`*.damaged-TIME`), never overwritten. Refused while a server of
  the run is live."""
  live = presence.servers(run_dir)
  if live:
    raise UserError(f"servers of this run are live ({', '.join(sorted(live))}); stop them "
                    "before rebuilding its switchboard")
  path, jpath = os.path.join(run_dir, FILE), os.path.join(run_dir, journal.FILE)
  kept, damaged_lines = journal.salvage(jpath)
  requests = {e.request_id: (e.seq, (e.request_id, e.action, list(e.sources), e.who, e.why,
                                     e.at)) for e in kept}
  from_db = 0
  if os.path.exists(path):
    try:
      db = catalog_lib.connect(path, "ro")
      try:
        rows = db.execute(f"SELECT {COLUMNS} FROM ledger ORDER BY seq").fetchall()
      finally:
        db.close()
      first = {}
      for r in rows:
        first.setdefault(r[1], r[0])
      for request in _requests(rows):
        from_db += request[0] not in requests
        requests.setdefault(request[0], (first[request[0]], request))
    except sqlite3.DatabaseError:
      pass   # unreadable: the journal is what is left
  entries = journal.chain(r for _, r in sorted(requests.values(), key=lambda x: x[0]))
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  new_journal = f"{jpath}.rebuild"
  if os.path.exists(new_journal):
    os.remove(new_journal)
  journal.append(new_journal, entries, journal.Tail([], 0, 0, "", 0))
  tmp = path + ".rebuilt"
  if os.path.exists(tmp):
    os.remove(tmp)
  _build(tmp, catalog_path, sources, entries)
  for old in (path, path + "-wal", path + "-shm"):
    if os.path.exists(old):
      os.rename(old, f"{old}.damaged-{stamp}")
  os.rename(tmp, path)
  if os.path.exists(jpath):
    os.rename(jpath, f"{jpath}.damaged-{stamp}")
  os.rename(new_journal, jpath)
  journal.sync_dir(run_dir)
  board = Switchboard(run_dir)
  unlearned = len(board.unlearned_ids())
  board.close()
  return {"requests": len(entries), "from_database_only": from_db,
          "damaged_journal_lines": damaged_lines, "unlearned": unlearned,
          "ledger_seq": entries[-1].last if entries else 0}
