"""Read character vectors out of an R package's lazy-load database (.rdx/.rdb) without R.

R ships package data as `Rdata.rdx` (gzip'd serialized index: name -> (offset, length) in the
.rdb) and `Rdata.rdb` (each object: 4-byte big-endian length + zlib'd XDR serialization).
Only the types that plain data objects use are decoded; anything else is a clear error.
"""

from __future__ import annotations

import gzip
import struct
import zlib

NIL, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC = 254, 1, 2, 9, 10, 13, 14, 16, 19
REF, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG = 255, 253, 242, 241, 251


class _Reader:
  def __init__(self, data: bytes):
    if data[:2] != b"X\n":
      raise ValueError("not an XDR R serialization")
    self.data, self.at, self.refs = data, 2, []
    version = self.int()
    self.at += 8                      # writer and minimal reader R versions
    if version == 3:
      length = self.int()             # native encoding name
      self.at += length

  def int(self) -> int:
    (value,) = struct.unpack_from(">i", self.data, self.at)
    self.at += 4
    return value

  def item(self):
    flags = self.int()
    kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
    if kind in (NIL, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG):
      return None
    if kind == REF:
      return self.refs[(flags >> 8 or self.int()) - 1]
    if kind == SYM:
      self.refs.append(self.item())
      return self.refs[-1]
    if kind == LIST:                  # pairlist: (attributes), (tag), car, cdr
      if has_attr:
        self.item()
      tag = self.item() if has_tag else None
      out = {tag: self.item()}
      return out | (self.item() or {})
    if kind == CHAR:
      n = self.int()
      if n == -1:
        return None                   # NA_character_
      text = self.data[self.at:self.at + n].decode("utf-8", errors="replace")
      self.at += n
      return text
    n = self.int()
    if kind == STR:
      value = [self.item() for _ in range(n)]
    elif kind == VEC:
      value = [self.item() for _ in range(n)]
    elif kind in (INT, LGL):
      value = list(struct.unpack_from(f">{n}i", self.data, self.at))
      self.at += 4 * n
    elif kind == REAL:
      value = list(struct.unpack_from(f">{n}d", self.data, self.at))
      self.at += 8 * n
    else:
      raise ValueError(f"R object type {kind} is not supported by this reader")
    if has_attr:
      names = self.item().get("names")
      if names is not None and kind == VEC:
        value = dict(zip(names, value))
    return value


def unserialize(data: bytes):
  return _Reader(data).item()


def read_lazyload(rdx: str, rdb: str) -> dict:
  """{object name: value} of every object in an R lazy-load database."""
  with gzip.open(rdx) as f:
    index = unserialize(f.read())
  with open(rdb, "rb") as f:
    blob = f.read()
  out = {}
  for name, (offset, length) in index["variables"].items():
    chunk = blob[int(offset):int(offset) + int(length)]
    out[name] = unserialize(zlib.decompress(chunk[4:]))
  return out
