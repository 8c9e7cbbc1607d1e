"""The source catalog: stable integer ids for source keys, in SQLite next to the data.

Ids are 1..N, assigned once in order of first appearance and never reused (AUTOINCREMENT),
and stay below 2**31 so they fit the int32 `source_ids` the model sees (0 = no source).
Titles are also stored normalised (NFKC, case-folded, whitespace collapsed) so a lookup by
any spelling variant finds the source. `status` is the switch unlearning flips later.
"""

from __future__ import annotations

import hashlib
import sqlite3
import unicodedata

from sinkformer.errors import UserError

MAX_ID = 2**31 - 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  key TEXT NOT NULL UNIQUE,
  title TEXT NOT NULL,
  title_norm TEXT NOT NULL,
  grp TEXT,
  documents INTEGER NOT NULL DEFAULT 0,
  tokens INTEGER NOT NULL DEFAULT 0,
  status TEXT NOT NULL DEFAULT 'active');
CREATE INDEX IF NOT EXISTS sources_title ON sources(title_norm);
CREATE TABLE IF NOT EXISTS documents (
  id INTEGER PRIMARY KEY,           -- the record's index in the prepared shards
  key TEXT NOT NULL UNIQUE,
  source_id INTEGER NOT NULL REFERENCES sources(id),
  origin TEXT NOT NULL);            -- file:line, for error messages
"""


def normalize(title: str) -> str:
  return " ".join(unicodedata.normalize("NFKC", title).casefold().split())


class Catalog:
  """A source catalog file. Writes happen in explicit transactions (`with catalog.batch():`)."""

  def __init__(self, path: str, create: bool = False):
    if not create:
      try:
        open(path, "rb").close()
      except OSError as e:
        raise UserError(f"no source catalog at {path}: {e.strerror} (run 'sinkformer data "
                        "prepare' first)") from None
    self.path = path
    self.db = sqlite3.connect(path, isolation_level=None)
    self.db.execute("PRAGMA journal_mode=WAL")
    self.db.executescript(SCHEMA)

  def close(self):
    self.db.close()

  def batch(self):
    """A transaction: everything inside lands together or not at all."""
    return _Transaction(self.db)

  def add_document(self, key: str, source_key: str, title: str, group: str | None,
                   origin: str, ordinal: int) -> int:
    """Register a document (and its source on first sight) -> the source id."""
    row = self.db.execute("SELECT id FROM sources WHERE key = ?", (source_key,)).fetchone()
    if row is None:
      cur = self.db.execute("INSERT INTO sources (key, title, title_norm, grp) VALUES (?,?,?,?)",
                            (source_key, title, normalize(title), group))
      source_id = cur.lastrowid
      if source_id > MAX_ID:
        raise UserError(f"source id {source_id} does not fit int32; the catalog is full")
    else:
      source_id = row[0]
    try:
      self.db.execute("INSERT INTO documents (id, key, source_id, origin) VALUES (?,?,?,?)",
                      (ordinal, key, source_id, origin))
    except sqlite3.IntegrityError:
      first = self.db.execute("SELECT origin FROM documents WHERE key = ?", (key,)).fetchone()
      raise UserError(f"duplicate document key {key!r} at {origin}; first seen at "
                      f"{first[0]}") from None
    return source_id

  def add_counts(self, counts):
    """counts: iterable of (source_id, documents, tokens) to add."""
    self.db.executemany("UPDATE sources SET documents = documents + ?, tokens = tokens + ? "
                        "WHERE id = ?", ((int(d), int(t), int(s)) for s, d, t in counts))

  def __len__(self) -> int:
    return self.db.execute("SELECT count(*) FROM sources").fetchone()[0]

  def get(self, ref) -> dict | None:
    """A source by id (int or digits), key, or title in any case/whitespace variant."""
    cols = "id, key, title, grp, documents, tokens, status"
    ref_s = str(ref).strip()
    if ref_s.isdigit():
      row = self.db.execute(f"SELECT {cols} FROM sources WHERE id = ?", (int(ref_s),)).fetchone()
      if row:
        return row_dict(row)
    row = self.db.execute(f"SELECT {cols} FROM sources WHERE key = ?", (ref_s,)).fetchone()
    row = row or self.db.execute(f"SELECT {cols} FROM sources WHERE title_norm = ?",
                                 (normalize(ref_s),)).fetchone()
    return row_dict(row) if row else None

  def resolve(self, refs) -> list[int]:
    """Source ids of keys/titles/ids; an unknown reference is an error naming it."""
    ids, unknown = [], []
    for ref in refs:
      row = self.get(ref)
      (unknown.append(ref) if row is None else ids.append(row["id"]))
    if unknown:
      shown = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
      raise UserError(f"unknown source(s) in {self.path}: {shown}")
    return ids

  def max_id(self) -> int:
    return self.db.execute("SELECT coalesce(max(id), 0) FROM sources").fetchone()[0]

  def digest(self) -> str:
    """sha256 over (id, key) in id order: the identity of the id assignment."""
    h = hashlib.sha256()
    for source_id, key in self.db.execute("SELECT id, key FROM sources ORDER BY id"):
      h.update(f"{source_id}\t{key}\n".encode())
    return h.hexdigest()


def row_dict(row) -> dict:
  return dict(zip(("id", "key", "title", "group", "documents", "tokens", "status"), row))


class _Transaction:
  def __init__(self, db):
    self.db = db

  def __enter__(self):
    self.db.execute("BEGIN")

  def __exit__(self, kind, *_):
    self.db.execute("COMMIT" if kind is None else "ROLLBACK")
