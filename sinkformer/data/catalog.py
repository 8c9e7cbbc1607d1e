"""The source catalog: stable integer ids for source keys, in SQLite next to the data.

Ids are 1..N, assigned once in order of first appearance and never reused (AUTOINCREMENT),
and stay below 2**31 so they fit the int32 `source_ids` the model sees (0 = no source).
Titles are also stored normalised (NFKC, case-folded, whitespace collapsed) so a lookup by
any spelling variant finds the source. `status` is the switch unlearning flips later.

A reference names sources explicitly (`id:12`, `key:person-7`, `title:Alan Turing`, `group:Emma`)
or bare (`12`, `Alan Turing`), in which case every reading is tried. Whatever can mean more than
one source (a bare `1` that is one source's id and another's title, a title two sources share, a
bare group name) is refused with the candidates listed, unless the caller asks for every match:
an erasure must never hit a source nobody meant.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import unicodedata
import urllib.parse

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
CREATE INDEX IF NOT EXISTS sources_grp ON sources(grp COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS documents (
  id INTEGER PRIMARY KEY,           -- the record's index in the prepared shards
  key TEXT NOT NULL UNIQUE,
  source_id INTEGER NOT NULL REFERENCES sources(id),
  origin TEXT NOT NULL);            -- file:line, for error messages
"""


def normalize(title: str) -> str:
  return " ".join(unicodedata.normalize("NFKC", title).casefold().split())


def connect(path: str, mode: str = "rw") -> sqlite3.Connection:
  """A connection to the database file at `path`: "rw" or "ro" (it must exist), "rwc" (it
  may be created). The only way any code here opens such a file: on POSIX, closing *any*
  descriptor of a file drops every lock this process holds on it, so a plain open()/close()
  beside a live connection lets another process checkpoint and delete the write-ahead log
  that connection still reads (its view goes stale). One connection may serve several
  threads; callers serialise their use of it."""
  uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode={mode}"
  return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)


class Catalog:
  """A source catalog file. Writes happen in explicit transactions (`with catalog.batch():`).

  `create=True` makes a new file (an existing one is refused: nothing is made over it);
  otherwise the file must exist and hold a catalog (an empty or foreign file is an error,
  never silently turned into an empty catalog)."""

  def __init__(self, path: str, create: bool = False):
    self.path = path
    if create:
      if os.path.exists(path):
        raise UserError(f"{path} exists; a new catalog is never made over a file")
      self.db = connect(path, "rwc")
      self.db.execute("PRAGMA journal_mode=WAL")
      self.db.executescript(SCHEMA)
      return
    try:
      self.db = connect(path, "rw")
      tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
      raise UserError(f"cannot read the source catalog {path}: {e} (run 'sinkformer data "
                      "prepare' to make one)") from None
    if "sources" not in tables:
      self.db.close()
      raise UserError(f"{path} holds no source catalog (empty or damaged; run 'sinkformer "
                      "data prepare' to make one)")

  def close(self):
    self.db.close()

  def without_lookup_indexes(self):
    """Drop the title and group indexes (a bulk load builds them once at the end)."""
    self.db.executescript("DROP INDEX IF EXISTS sources_title; DROP INDEX IF EXISTS sources_grp;")

  def with_lookup_indexes(self):
    self.db.executescript(SCHEMA)   # every statement is IF NOT EXISTS: only the indexes run

  def batch(self):
    """A transaction: everything inside lands together or not at all."""
    return _Transaction(self.db)

  def add_document(self, key: str, source_key: str, title: str, group: str | None,
                   origin: str, ordinal: int) -> int:
    """Register a document (and its source on first sight) -> the source id."""
    return self.add_documents([(key, source_key, title, group, origin, ordinal)])[0]

  def add_documents(self, docs) -> list[int]:
    """Register documents [(key, source key, title, group, origin, ordinal)] in one go (a
    source is created, in order, at its first document) -> their source ids."""
    self.db.executemany("INSERT OR IGNORE INTO sources (key, title, title_norm, grp) "
                        "VALUES (?,?,?,?)", ((s, t, normalize(t), g) for _, s, t, g, _, _ in docs))
    keys = list(dict.fromkeys(d[1] for d in docs))
    ids = {}
    for start in range(0, len(keys), 900):
      part = keys[start:start + 900]
      ids.update(self.db.execute(f"SELECT key, id FROM sources WHERE key IN "
                                 f"({','.join('?' * len(part))})", part))
    if ids and max(ids.values()) > MAX_ID:
      raise UserError(f"source id {max(ids.values())} does not fit int32; the catalog is full")
    try:
      self.db.executemany("INSERT INTO documents (id, key, source_id, origin) VALUES (?,?,?,?)",
                          ((o, k, ids[s], origin) for k, s, _, _, origin, o in docs))
    except sqlite3.IntegrityError:   # name the duplicate and where it was first seen
      seen = {}
      for key, *_, origin, _ in docs:
        before = self.db.execute("SELECT origin FROM documents WHERE key = ? AND id < ?",
                                 (key, docs[0][5])).fetchone()
        first = seen.get(key) or (before and before[0])
        if first:
          raise UserError(f"duplicate document key {key!r} at {origin}; first seen at "
                          f"{first}") from None
        seen[key] = origin
      raise
    return [ids[d[1]] for d in docs]

  def set_counts(self, counts):
    """counts: iterable of (source_id, documents, tokens)."""
    self.db.executemany("UPDATE sources SET documents = ?, tokens = ? WHERE id = ?",
                        ((int(d), int(t), int(s)) for s, d, t in counts))

  def __len__(self) -> int:
    return self.db.execute("SELECT count(*) FROM sources").fetchone()[0]

  def lookup(self, ref, all_matching: bool = False) -> list[dict]:
    """Every source `ref` names ([] if none). Explicit forms read one way (`group:` means the
    whole group); a bare reference is tried as an id (if digits), key, title and group. More
    than one source is an `Ambiguous` error unless `all_matching` (or `group:`)."""
    ref_s = str(ref).strip()
    form, colon, rest = ref_s.partition(":")
    forms = (form,) if colon and form in FORMS else FORMS
    value = rest.strip() if forms != FORMS else ref_s
    found: dict[int, tuple[dict, list[str]]] = {}
    for f in forms:
      if f == "id" and not _is_id(value):
        if forms != FORMS:
          raise UserError(f"{ref_s!r}: an id is a number from 1 to {MAX_ID}, e.g. id:12")
        continue
      for row in self._match(f, value):
        found.setdefault(row["id"], (row, []))[1].append(f)
    rows = [row for row, _ in found.values()]
    if len(rows) > 1 and not (all_matching or forms == ("group",)):
      raise Ambiguous(ref_s, [(row, how) for row, how in found.values()])
    return rows

  def _match(self, form: str, value: str) -> list[dict]:
    where, arg = {"id": ("id = ?", int(value) if _is_id(value) else -1),
                  "key": ("key = ?", value), "title": ("title_norm = ?", normalize(value)),
                  "group": ("grp = ? COLLATE NOCASE", " ".join(value.split()))}[form]
    return [row_dict(r) for r in self.db.execute(f"SELECT {COLUMNS} FROM sources WHERE {where} "
                                                 "ORDER BY id", (arg,))]

  def get(self, ref) -> dict | None:
    """The one source `ref` names, or None; `Ambiguous` if it names several."""
    rows = self.lookup(ref)
    return rows[0] if rows else None

  def resolve(self, refs, all_matching: bool = False) -> list[dict]:
    """The sources of every reference (each once, in order); unknown references are one
    error naming them, ambiguous ones an `Ambiguous` error listing the candidates."""
    found, unknown = {}, []
    for ref in refs:
      rows = self.lookup(ref, all_matching)
      if not rows:
        unknown.append(ref)
      found.update((r["id"], r) for r in rows)
    if unknown:
      shown = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
      raise UserError(f"unknown source(s) in {self.path}: {shown}")
    return list(found.values())

  def digest(self) -> str:
    """sha256 over (id, key) in id order: the identity of the id assignment."""
    h = hashlib.sha256()
    for source_id, key in self.db.execute("SELECT id, key FROM sources ORDER BY id"):
      h.update(f"{source_id}\t{key}\n".encode())
    return h.hexdigest()


FORMS = ("id", "key", "title", "group")


def _is_id(value: str) -> bool:
  """ASCII digits of a number an id can be (str.isdigit also takes '²'; SQLite refuses
  integers over 64 bits)."""
  return value.isascii() and value.isdigit() and int(value) <= MAX_ID
COLUMNS = "id, key, title, grp, documents, tokens, status"


def row_dict(row) -> dict:
  return dict(zip(("id", "key", "title", "group", "documents", "tokens", "status"), row))


class Ambiguous(UserError):
  """A reference that names more than one source, where one was meant."""

  def __init__(self, ref: str, candidates: list[tuple[dict, list[str]]]):
    self.ref, self.candidates = ref, [row for row, _ in candidates]
    shown = "; ".join(f"id:{r['id']} (key {r['key']!r}, title {r['title']!r}"
                      + (f", group {r['group']!r}" if r["group"] else "")
                      + f", {r['status']}; matched as {'/'.join(how)})"
                      for r, how in candidates[:10])
    more = f"; and {len(candidates) - 10} more" if len(candidates) > 10 else ""
    super().__init__(f"{ref!r} names {len(candidates)} sources: {shown}{more}. Name one "
                     "explicitly (id:N, key:K, title:T), use group:NAME for a whole group, or "
                     "ask for every match (--all-matching)")


class _Transaction:
  def __init__(self, db):
    self.db = db

  def __enter__(self):
    self.db.execute("BEGIN")

  def __exit__(self, kind, *_):
    self.db.execute("COMMIT" if kind is None else "ROLLBACK")
