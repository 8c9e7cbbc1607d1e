"""The switchboard: which sources of a run are unlearned, and the ledger of every change.

It lives in the run directory (`sources.sqlite`; a run in a bucket has it in its local mirror,
pushed after every change, see storage.py): a copy of the source catalog made when the
run starts, whose `status` column is the switch (active / unlearned), plus an append-only
`ledger` (request id, action, source, who, why, when; triggers reject UPDATE and DELETE). A
request is one transaction: all of its sources change, or none (SQLite's journal makes that
survive a crash). Unlearning is idempotent. Reactivation is a separate action that the run
must allow explicitly.

Serving code asks `active(ref)` for every source a user names (a refusal for unlearned ones)
and `events_since(seq)` to fold new unlearning into its in-graph exclusion mask.
"""

from __future__ import annotations

import datetime
import getpass
import os
import sqlite3
import uuid

from sinkformer import storage
from sinkformer.data import catalog as catalog_lib
from sinkformer.errors import UserError

FILE = "sources.sqlite"
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


class Refused(UserError):
  """A request for an unlearned source (by any name): never served."""


def create(run_dir: str, catalog_path: str | None = None, sources=()) -> str:
  """The run's switchboard, made once: a copy of `catalog_path`, or (built-in corpus,
  mixtures) a new catalog of `sources` = [(id, key, title, group, documents, tokens)].
  An existing one is never touched."""
  path = os.path.join(run_dir, FILE)
  if os.path.exists(path):
    return path
  tmp = path + ".tmp"
  if os.path.exists(tmp):
    os.remove(tmp)
  if catalog_path:
    with sqlite3.connect(catalog_path) as src, sqlite3.connect(tmp) as dst:
      src.backup(dst)
    sqlite3.connect(tmp).close()
  else:
    cat = catalog_lib.Catalog(tmp, create=True)
    with cat.batch():
      cat.db.executemany(
          "INSERT INTO sources (id, key, title, title_norm, grp, documents, tokens) "
          "VALUES (?,?,?,?,?,?,?)",
          [(i, k, t, catalog_lib.normalize(t), g, n, m) for i, k, t, g, n, m in sources])
    cat.close()
  db = sqlite3.connect(tmp)
  db.executescript(LEDGER)
  db.close()
  os.replace(tmp, path)
  return path


class Switchboard:

  def __init__(self, run_dir: str):
    path = os.path.join(run_dir, FILE)
    if not os.path.exists(path):
      raise UserError(f"{run_dir} has no switchboard ({FILE}): is it a sinkformer run "
                      "directory that has started training?")
    self.run_dir = run_dir
    self.catalog = catalog_lib.Catalog(path)
    self.db = self.catalog.db
    self.db.execute("PRAGMA busy_timeout = 10000")   # several processes may write

  def close(self):
    self.catalog.close()

  def resolve(self, refs, all_matching: bool = False) -> list[dict]:
    """Sources named by id, key, title (any spelling) or `group:` (all its sources); unknown
    names are one error listing them, and a name that could mean several sources is refused
    with the candidates (catalog.Ambiguous) unless `all_matching`."""
    return self.catalog.resolve(refs, all_matching)

  def active(self, ref) -> dict:
    """The one source `ref` names, if it may be served; a Refused error if it was unlearned.
    A reference to several sources (a group, a shared title) is refused too: a mode serves
    one source."""
    rows = self.resolve([ref])
    gone = [r for r in rows if r["status"] != "active"]
    if gone:
      raise Refused(f"source {ref!r} has been unlearned (request "
                    f"{self.last_request(gone[0]['id'])}); it cannot be served")
    if len(rows) > 1:
      raise UserError(f"{ref!r} names {len(rows)} sources; a mode serves one (name it by id:N "
                      "or key:K)")
    return rows[0]

  def last_request(self, source_id: int) -> str | None:
    row = self.db.execute("SELECT request_id FROM ledger WHERE source_id = ? ORDER BY seq DESC "
                          "LIMIT 1", (source_id,)).fetchone()
    return row[0] if row else None

  def _change(self, refs, action: str, why: str, who: str | None, all_matching: bool) -> dict:
    to, frm = ("unlearned", "active") if action == "unlearn" else ("active", "unlearned")
    request = uuid.uuid4().hex[:16]
    who = who or getpass.getuser()
    at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    self.db.execute("BEGIN IMMEDIATE")   # one writer; every row of the request or none
    try:
      rows = self.resolve(refs, all_matching)
      changing = [r["id"] for r in rows if r["status"] == frm]
      self.db.executemany("UPDATE sources SET status = ? WHERE id = ?",
                          ((to, i) for i in changing))
      self.db.executemany("INSERT INTO ledger (request_id, action, source_id, who, why, at) "
                          "VALUES (?,?,?,?,?,?)",
                          ((request, action, i, who, why, at) for i in changing))
      self.db.execute("COMMIT")
    except BaseException:
      self.db.execute("ROLLBACK")
      raise
    if changing:
      storage.push(self.run_dir)   # a run in a bucket: the change reaches it now
    return {"request_id": request if changing else None, "action": action,
            "changed": changing, "unchanged": [r["id"] for r in rows if r["status"] != frm]}

  def unlearn(self, refs, why: str, who: str | None = None, all_matching: bool = False) -> dict:
    return self._change(refs, "unlearn", why, who, all_matching)

  def reactivate(self, refs, why: str, who: str | None = None, allowed: bool = False,
                 all_matching: bool = False) -> dict:
    if not allowed:
      raise Refused("reactivating unlearned sources is off for this run (config "
                    "unlearn.allow_reactivation = False)")
    return self._change(refs, "reactivate", why, who, all_matching)

  def events_since(self, seq: int) -> tuple[list[tuple[str, int]], int]:
    """([(action, source id)], newest seq) of ledger rows after `seq`."""
    rows = self.db.execute("SELECT seq, action, source_id FROM ledger WHERE seq > ? ORDER BY seq",
                           (seq,)).fetchall()
    return [(a, s) for _, a, s in rows], (rows[-1][0] if rows else seq)

  def ledger_seq(self) -> int:
    """The newest ledger entry's number (0: none yet)."""
    return self.db.execute("SELECT coalesce(max(seq), 0) FROM ledger").fetchone()[0]

  def unlearned_ids(self) -> list[int]:
    return [r[0] for r in self.db.execute("SELECT id FROM sources WHERE status = 'unlearned'")]

  def ledger(self, source_id: int | None = None) -> list[dict]:
    where, args = ("WHERE source_id = ?", (source_id,)) if source_id is not None else ("", ())
    cols = ("seq", "request_id", "action", "source_id", "who", "why", "at")
    return [dict(zip(cols, r)) for r in self.db.execute(
        f"SELECT {', '.join(cols)} FROM ledger {where} ORDER BY seq", args)]

  def search(self, text: str, limit: int = 20) -> list[dict]:
    """Sources whose title contains `text` (case-insensitive), active and unlearned."""
    rows = self.db.execute(f"SELECT {catalog_lib.COLUMNS} FROM sources "
                           "WHERE title_norm LIKE ? ESCAPE '\\' ORDER BY id LIMIT ?",
                           (f"%{_like_escaped(catalog_lib.normalize(text))}%", limit)).fetchall()
    return [catalog_lib.row_dict(r) for r in rows]

  def page(self, status: str | None, offset: int, limit: int) -> list[dict]:
    where, args = ("WHERE status = ?", (status,)) if status else ("", ())
    rows = self.db.execute(f"SELECT {catalog_lib.COLUMNS} FROM sources "
                           f"{where} ORDER BY id LIMIT ? OFFSET ?", (*args, limit, offset))
    return [catalog_lib.row_dict(r) for r in rows]

  def counts(self) -> dict:
    return dict(self.db.execute("SELECT status, count(*) FROM sources GROUP BY status"))


def _like_escaped(text: str) -> str:
  """`text` matched literally inside a LIKE pattern (its % and _ are not wildcards)."""
  return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
