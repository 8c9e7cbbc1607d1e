"""Reading corpora as documents: canonical JSONL, plain-text folders, MediaWiki dumps, TFDS.

Canonical JSONL: one object per line with `text` and `key` (or `title`), optional `title`,
`group` (e.g. the book of a chapter) and any metadata. Every reader yields `Document`s and
keeps `Counts` of what it skipped, so nothing is dropped without being counted.
"""

from __future__ import annotations

import bz2
import dataclasses
import json
import os
import xml.etree.ElementTree as ET

from sinkformer import storage
from sinkformer.errors import UserError


@dataclasses.dataclass
class Document:
  key: str
  title: str
  text: str
  group: str | None = None
  meta: dict = dataclasses.field(default_factory=dict)
  origin: str = ""            # file:line (or page/record) for error messages


@dataclasses.dataclass
class Counts:
  documents: int = 0          # yielded
  empty: int = 0              # skipped: empty or whitespace-only text
  malformed: int = 0          # skipped under skip_bad
  invalid_utf8: int = 0       # kept, with undecodable bytes replaced by U+FFFD

  def add(self, other: "Counts"):
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def _decode(raw: bytes, counts: Counts) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    counts.invalid_utf8 += 1
    return raw.decode("utf-8", errors="replace")


def _keep(doc: Document, counts: Counts) -> bool:
  if not doc.text.strip():
    counts.empty += 1
    return False
  counts.documents += 1
  return True


def read_jsonl(path: str, counts: Counts, skip_bad: bool = False):
  with storage.path(path).open("rb") as f:
    for lineno, raw in enumerate(f, start=1):
      doc = parse_jsonl_line(raw, f"{path}:{lineno}", counts, skip_bad)
      if doc is not None:
        yield doc


def is_jsonl(spec: str) -> bool:
  """Whether `read` reads `spec` as JSONL (so its lines can be parsed anywhere)."""
  return not spec.startswith("tfds:") and not spec.endswith((".xml", ".xml.bz2")) and \
      storage.path(spec).is_file()


def parse_jsonl_line(raw: bytes, origin: str, counts: Counts,
                     skip_bad: bool = False) -> Document | None:
  """One canonical JSONL line -> its Document, or None (blank, empty text, or malformed under
  skip_bad: counted); a malformed line is an error naming `origin` (FILE:LINE)."""
  if not raw.strip():
    return None
  try:
    obj = json.loads(_decode(raw, counts))
    if not isinstance(obj, dict):
      raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("text"), str):
      raise ValueError("no string field 'text'")
    key = obj.get("key", obj.get("title"))
    if not isinstance(key, (str, int)) or isinstance(key, bool) or str(key) == "":
      raise ValueError("no 'key' (or 'title') to identify the document")
  except ValueError as e:   # json.JSONDecodeError is a ValueError
    if skip_bad:
      counts.malformed += 1
      return None
    raise UserError(f"{origin}: malformed line: {e} (fix it, or pass --skip_bad to skip "
                    "and count such lines)") from None
  meta = {k: v for k, v in obj.items() if k not in ("key", "title", "text", "group")}
  group = obj.get("group")
  doc = Document(str(key), str(obj.get("title") or key), obj["text"],
                 None if group is None else str(group), meta, origin)
  return doc if _keep(doc, counts) else None


def read_text_folder(path: str, counts: Counts):
  """Every *.txt below `path` is a document; its folder (relative) is its group."""
  root = storage.path(path)
  files = sorted((f for f in storage.files(root) if f.name.endswith(".txt")),
                 key=os.fspath)   # the order of source ids
  if not files:
    raise UserError(f"{path} has no .txt files")
  for file in files:
    rel = file.relative_to(root).as_posix()[:-4]
    text = _decode(file.read_bytes(), counts)
    folder = os.path.dirname(rel)
    doc = Document(rel, os.path.basename(rel).replace("_", " "), text, folder or None, {},
                   os.fspath(file))
    if _keep(doc, counts):
      yield doc


def read_mediawiki(path: str, counts: Counts):
  """Articles (namespace 0, not redirects) of a MediaWiki XML dump (.xml or .xml.bz2), with
  the markup stripped by mwparserfromhell."""
  import mwparserfromhell
  raw = storage.path(path).open("rb")
  with (bz2.open(raw, "rb") if path.endswith(".bz2") else raw) as f:
    try:
      for number, (_, page) in enumerate(ET.iterparse(f), start=1):
        if not page.tag.endswith("}page") and page.tag != "page":
          continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in page.iter()}
        if fields["ns"].text == "0" and "redirect" not in fields:
          markup = fields["text"].text or ""
          text = _strip_markup(mwparserfromhell.parse(markup))
          title = fields["title"].text
          doc = Document(title, title, text, None, {"page_id": fields["id"].text},
                         f"{path}:page {fields['id'].text}")
          if _keep(doc, counts):
            yield doc
        page.clear()
    except ET.ParseError as e:
      raise UserError(f"{path}: not a readable MediaWiki XML dump: {e}") from None


def _strip_markup(wikicode) -> str:
  """Plain text of parsed wikitext: references removed, markup stripped, and blank runs and
  lines of punctuation only (leftovers of tables and templates) dropped."""
  for ref in wikicode.filter_tags(matches=lambda node: str(node.tag).lower() == "ref"):
    try:
      wikicode.remove(ref)
    except ValueError:   # already removed with an enclosing node
      pass
  text = wikicode.strip_code(normalize=True, collapse=True)
  lines = [" ".join(line.split()) for line in text.splitlines()]
  return "\n".join(line for line in lines if any(c.isalnum() for c in line))


def read_tfds(spec: str, data_dir: str | None, counts: Counts):
  """`tfds:NAME[:SPLIT]` (e.g. tfds:wikipedia/20231101.en:train), prepared as array_record.
  Fields used: text, title, and id when present (else the title is the key)."""
  import tensorflow_datasets as tfds
  _, name, *split = spec.split(":")
  try:
    source = tfds.data_source(name, split=split[0] if split else "train", data_dir=data_dir)
  except Exception as e:   # tfds raises many types; all mean "not prepared here"
    raise UserError(f"cannot open TFDS dataset {name!r} in {data_dir}: {e}") from None
  for i in range(len(source)):
    record = source[i]
    text = lambda k: _decode(record[k], counts) if isinstance(record.get(k), bytes) else record.get(k)
    title = text("title") or str(i)
    doc = Document(str(text("id") or title), title, text("text") or "", None, {},
                   f"tfds:{name}[{i}]")
    if _keep(doc, counts):
      yield doc


def read(spec: str, counts: Counts, skip_bad: bool = False, tfds_dir: str | None = None):
  """Documents of a corpus spec: a .jsonl file, a folder of .txt, a MediaWiki .xml[.bz2] dump
  or tfds:NAME[:SPLIT]."""
  if spec.startswith("tfds:"):
    return read_tfds(spec, tfds_dir, counts)
  where = storage.path(spec)
  if where.is_dir():
    return read_text_folder(spec, counts)
  if not where.is_file():
    raise UserError(f"corpus {spec!r} not found: give a .jsonl file, a folder of .txt files, "
                    "a MediaWiki .xml/.xml.bz2 dump, tfds:NAME, or a name from 'sinkformer "
                    "data fetch'")
  if spec.endswith((".xml", ".xml.bz2")):
    return read_mediawiki(spec, counts)
  with where.open("rb") as f:   # a binary file would fail line by line, or be skipped whole
    if b"\0" in f.read(1 << 16):
      raise UserError(f"corpus {spec!r} is not text (it holds NUL bytes): a corpus file is JSONL, "
                      'one {"key": ..., "text": ...} object per line (a compressed file: '
                      "decompress it first)")
  return read_jsonl(spec, counts, skip_bad)
