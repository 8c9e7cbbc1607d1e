"""The ledger's second copy: `ledger.jsonl` in the run directory, append-only and hash-chained.

One line per request that changed something: its first ledger number (`seq`; the request's
sources take seq, seq+1, ...), request id, action, source ids, who, why, when, the previous
line's hash (`prev`) and its own (`sha256`, over every other field). The switchboard writes
and fsyncs the line *before* it commits the request, under its write lock, so an
acknowledged change is on disk twice, and the two copies can each rebuild the other:

  - a line the database lacks (the process died between the fsync and the commit) is
    rolled forward into it: a change that was asked for lands, even if its caller saw an
    error;
  - database entries the journal lacks (a journal deleted, truncated, or older than the
    database) are appended to it;
  - a damaged database is rebuilt from the run's catalog and this file (`sinkformer sources
    rebuild`).

A last line cut short is a write that never completed (never acknowledged) and is dropped
by the next writer; damage anywhere else is an error naming the line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from sinkformer.errors import UserError

FILE = "ledger.jsonl"
TAIL_BLOCK = 1 << 16


class Damaged(UserError):
  """The journal cannot be trusted as it is (a bad line before its end, a broken chain)."""


@dataclasses.dataclass(frozen=True)
class Entry:
  seq: int
  request_id: str
  action: str
  sources: tuple[int, ...]
  who: str
  why: str
  at: str
  prev: str
  sha256: str

  @property
  def last(self) -> int:
    """The ledger number of the request's last source."""
    return self.seq + len(self.sources) - 1

  def rows(self):
    """(seq, request_id, action, source_id, who, why, at) per source, as the ledger table has."""
    return [(self.seq + i, self.request_id, self.action, s, self.who, self.why, self.at)
            for i, s in enumerate(self.sources)]


def _digest(fields: dict) -> str:
  return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":"),
                                   ensure_ascii=False).encode()).hexdigest()


def make(seq: int, request_id: str, action: str, sources, who: str, why: str, at: str,
         prev: str) -> Entry:
  fields = {"seq": seq, "request_id": request_id, "action": action,
            "sources": [int(s) for s in sources], "who": who, "why": why, "at": at, "prev": prev}
  return Entry(**{**fields, "sources": tuple(fields["sources"])}, sha256=_digest(fields))


def _encode(e: Entry) -> bytes:
  fields = dataclasses.asdict(e)
  fields["sources"] = list(e.sources)
  return (json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _parse(line: bytes) -> Entry | None:
  """The entry a line holds, or None if it is not a whole, intact one."""
  try:
    fields = json.loads(line)
    got = fields.pop("sha256")
    if _digest(fields) != got:
      return None
    return Entry(**{**fields, "sources": tuple(fields["sources"])}, sha256=got)
  except (ValueError, KeyError, TypeError, AttributeError):
    return None


@dataclasses.dataclass
class Tail:
  """The end of a journal: the entries after some ledger number, the number the journal
  ends at (`last`), where its intact part ends (`size`, in bytes) and the hash the next
  line must chain to (`tip`)."""
  entries: list[Entry]
  last: int
  size: int
  tip: str
  torn: int   # bytes of an incomplete last line after `size` (0: none)


def read(path: str, after: int = 0) -> Tail:
  """The entries that end after ledger number `after` (all of them for 0), checked: each
  line's hash, the chain between the lines read, consecutive numbers. Reads backwards from
  the end, so the cost is the size of what is asked for, not of the file. A missing file
  is an empty journal."""
  try:
    f = open(path, "rb")
  except FileNotFoundError:
    return Tail([], 0, 0, "", 0)
  with f:
    end = f.seek(0, os.SEEK_END)
    block = TAIL_BLOCK
    while True:   # widen the window until it starts at a line that ends at or before `after`
      start = max(0, end - block)
      block *= 2
      f.seek(start)
      data = f.read(end - start)
      lines = data.split(b"\n")
      if start == 0:
        break
      whole = [_parse(l) for l in lines[1:-1]]   # lines[0] may be cut by the window
      if any(e is not None and e.last <= after for e in whole):
        break
  torn = len(lines[-1])   # bytes after the last newline: a write that never completed
  lines = lines[:-1]
  offset = start
  if start > 0:
    offset += len(lines[0]) + 1
    lines = lines[1:]
  entries, tip, size = [], None, offset
  for number, line in enumerate(lines):
    e = _parse(line)
    if e is None:
      if number == len(lines) - 1 and torn == 0:   # a complete but garbled last line: never acknowledged
        torn = len(line) + 1
        break
      raise Damaged(f"{path}: line at byte {size} is damaged; run 'sinkformer sources "
                    "rebuild' (it keeps every entry the database still has)")
    if tip is not None and (e.prev != tip or e.seq != entries[-1].last + 1):
      raise Damaged(f"{path}: the chain breaks at byte {size} (seq {e.seq}); run 'sinkformer "
                    "sources rebuild'")
    if start == 0 and tip is None and e.prev != "":
      raise Damaged(f"{path}: its first line does not start the chain; run 'sinkformer "
                    "sources rebuild'")
    tip = e.sha256
    size += len(line) + 1
    entries.append(e)
  return Tail([e for e in entries if e.last > after], entries[-1].last if entries else 0, size,
              tip or "", torn)


def append(path: str, entries: list[Entry], tail: Tail):
  """Write `entries` after the intact end of the journal (dropping a torn last line first)
  and fsync: when this returns they are on disk. The caller holds the switchboard's write
  lock, so no other writer is between its read of `tail` and this."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)   # O_CREAT without O_TRUNC: never over a file
  try:
    if tail.torn:
      os.ftruncate(fd, tail.size)
    os.lseek(fd, tail.size, os.SEEK_SET)
    data = b"".join(map(_encode, entries))
    while data:
      data = data[os.write(fd, data):]
    os.fsync(fd)
  finally:
    os.close(fd)
  if entries:
    tail.entries += entries
    tail.size += sum(len(_encode(e)) for e in entries)
    tail.last, tail.tip, tail.torn = entries[-1].last, entries[-1].sha256, 0


def salvage(path: str) -> tuple[list[Entry], int]:
  """(every intact line's entry in file order, how many lines were damaged): what a rebuild
  can still use of a damaged journal (each line carries its own hash)."""
  try:
    with open(path, "rb") as f:
      lines = f.read().split(b"\n")
  except FileNotFoundError:
    return [], 0
  entries = [_parse(l) for l in lines if l.strip()]
  return [e for e in entries if e is not None], sum(e is None for e in entries)


def chain(requests) -> list[Entry]:
  """A fresh journal's entries for `requests` [(request_id, action, sources, who, why, at)]
  in order, numbered from 1."""
  out, seq, prev = [], 1, ""
  for request_id, action, sources, who, why, at in requests:
    out.append(make(seq, request_id, action, sources, who, why, at, prev))
    seq, prev = out[-1].last + 1, out[-1].sha256
  return out


def create(path: str):
  """An empty journal (fsynced, with its directory entry), if there is none."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return
  os.fsync(fd)
  os.close(fd)
  sync_dir(os.path.dirname(os.path.abspath(path)))


def sync_dir(directory: str):
  """Make a directory's entries (a new or renamed file) survive a power cut."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
