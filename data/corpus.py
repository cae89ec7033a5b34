"""Text corpora as TFDS datasets in the array_record format.

Five sources share one code path (``config.data.source``):

- ``stdlib``: the embedded default, the ``.py`` files of the running
  interpreter's standard library (no network needed). ``test/``, ``tests/``,
  ``idlelib`` and ``site-packages`` are skipped.
- ``files``: a glob of local text files (``config.data.files_glob``), one
  document each.

  For these two, ``config.data.documents="package"`` makes a document of
  each top-level folder instead (``email/``, ``asyncio/``, ``json/``, ...):
  its files in path order, each after a ``# file: <path>`` line, so that what
  one file defines is used thousands of tokens later; the validation split
  is then chosen by package.
- ``jsonl`` / ``parquet``: a glob of JSON-lines files (``.gz`` too) or Parquet
  files, one document per record, its text in the field
  ``config.data.text_key``; read as streams (a line, a record batch at a
  time).
- ``tfds``: any TFDS text dataset by name (``config.data.tfds_name``), whose
  text feature is ``config.data.text_key``; this one needs the network the
  first time TFDS prepares it.

For ``stdlib`` and ``files`` the validation split is chosen by a hash of the
file's path relative to its root, for ``jsonl`` and ``parquet`` by a hash of
the record's file and line (or row), so the split is the same on every run and
every machine with the same files.

Building the local corpora streams: TFDS sorts the examples by a hash of
their keys and keeps up to 1 GB of them in memory to do it, beyond which it
sorts through bucket files on disk with TensorFlow's file API. ``build``
lowers the memory to ``SORT_MEMORY`` bytes and gives TFDS buckets on plain
files (``_FileBucket``): the same order, no TensorFlow, and a large corpus
never sits whole in memory. Bytes that are not valid UTF-8 are decoded
with U+FFFD replacement and counted; the count is logged as a warning with the
first offending path.

A TFDS builder defined outside TFDS's own package cannot use
``dataset_info_from_configs`` (it looks for metadata files beside the module),
so ``_info`` constructs ``tfds.core.DatasetInfo`` directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import logging as py_logging
import glob as globlib
import hashlib
import itertools
import os
import struct
import sys
import sysconfig
from typing import Any, Iterator

from absl import logging
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from distill.core.errors import UserError

SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "__pycache__"}
)
TRAIN, VALIDATION = "train", "validation"
RECORD_KINDS = ("jsonl", "parquet")
SORT_MEMORY = 16 << 20


class CorpusError(UserError):
  """The corpus is empty, missing or misconfigured."""


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
  """Sorted ``.py`` paths of the standard library, skipping tests and IDLE."""
  root = root or stdlib_root()
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
    files.extend(
        os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")
    )
  return files


def glob_files(pattern: str) -> list[str]:
  """Sorted regular files matching ``pattern`` (``**`` recurses)."""
  return sorted(
      p
      for p in globlib.glob(os.path.expanduser(pattern), recursive=True)
      if os.path.isfile(p)
  )


def is_validation(relpath: str, validation_permille: int) -> bool:
  """Deterministic split: a stable hash of the relative path."""
  digest = hashlib.sha1(relpath.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % 1000 < validation_permille


def split_files(
    files: list[str], root: str, validation_permille: int, group=None
) -> dict[str, list[str]]:
  """Train and validation files, by a hash of each file's path relative to
  ``root`` (or of ``group(path)``: the files of a group stay together)."""
  splits: dict[str, list[str]] = {TRAIN: [], VALIDATION: []}
  for path in files:
    rel = os.path.relpath(path, root)
    key = group(rel) if group else rel
    splits[
        VALIDATION if is_validation(key, validation_permille) else TRAIN
    ].append(path)
  return splits


def package_of(relpath: str) -> str:
  """The top-level folder a file belongs to (``email`` for
  ``email/mime/text.py``), or the file itself when it has none."""
  parts = relpath.split(os.sep)
  return parts[0] if len(parts) > 1 else relpath


def package_document(parts: list[tuple[str, str]]) -> str:
  """One document of a package's files, in the order given, each after a
  header line with its path: names defined in one file are used thousands
  of tokens later in another."""
  return "\n".join(f"# file: {rel}\n{text}" for rel, text in parts)


def read_text(path: str) -> tuple[str, int]:
  """The file's text and the number of undecodable bytes replaced."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8"), 0
  except UnicodeDecodeError:
    text = raw.decode("utf-8", errors="replace")
    # Each replacement stands for one or more undecodable bytes; count the
    # characters introduced by the replacement, not those already present.
    return text, text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))


@dataclasses.dataclass
class FilesCorpusConfig(tfds.core.BuilderConfig):
  """Which files make the corpus; the name keys the prepared dataset on disk."""

  root: str = ""
  pattern: str = ""  # empty: the standard library under ``root``
  max_files: int = 0  # 0: all files (after the split)
  validation_permille: int = 20
  kind: str = "text"  # text: a document per file | jsonl | parquet
  # text: "file" (a document each) or "package" (a top-level folder's files
  # joined into one document, ``package_document``)
  documents: str = "file"
  text_key: str = "text"  # jsonl, parquet: the field with the text


class _LocalInfo(tfds.core.DatasetInfo):
  """A local corpus's ``DatasetInfo``: nothing of it is in TFDS's bucket.

  A builder whose data is not built yet asks the bucket for its info, and
  TFDS makes a temporary folder for the answer before it looks; with the
  bucket off (as here) it returns at once and leaves the empty folder in
  the system's temporary directory, one per builder.
  """

  def initialize_from_bucket(self) -> None:
    pass


class FilesCorpus(tfds.core.GeneratorBasedBuilder):
  """Local text files (the stdlib default or a glob), one example per file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  # TFDS announces a download ("Downloading and preparing dataset Unknown
  # size ...") and its end; these files are local, so there is nothing to
  # announce: the prepare stage prints what it made.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalInfo(
        builder=self,
        description="Local text files, one example per file.",
        features=tfds.features.FeaturesDict(
            {
                "text": tfds.features.Text(),
                "path": tfds.features.Text(),
            }
        ),
    )

  def _files(self) -> list[str]:
    if getattr(self, "_matched", None) is None:
      self._matched = self._find_files()  # pylint: disable=attribute-defined-outside-init
    return self._matched

  def _find_files(self) -> list[str]:
    cfg = self.builder_config
    files = glob_files(cfg.pattern) if cfg.pattern else stdlib_files(cfg.root)
    if not files:
      what = f"the glob {cfg.pattern!r}" if cfg.pattern else f"{cfg.root!r}"
      raise CorpusError(
          f"No input files: {what} matched nothing. Check config.data.files_glob"
          " (use ** to recurse) or the path."
      )
    return files

  def _root(self) -> str:
    cfg = self.builder_config
    if not cfg.pattern:
      return cfg.root
    return os.path.commonpath(
        [os.path.dirname(p) for p in self._files()] or ["/"]
    )

  def splits(self) -> dict[str, list[str]]:
    """The files of each split: split by path hash, then cut to
    ``max_files`` in all (in proportion) when it is set."""
    cfg = self.builder_config
    files = self._files()
    if cfg.kind in RECORD_KINDS:  # both read every file, records split by key
      kept = files[: cfg.max_files] if cfg.max_files else files
      return {TRAIN: kept, VALIDATION: kept}
    group = package_of if cfg.documents == "package" else None
    splits = split_files(files, self._root(), cfg.validation_permille, group)
    if cfg.max_files:
      splits = {
          k: v[: max(1, cfg.max_files * len(v) // len(files))]
          for k, v in splits.items()
      }
    for name, kept in splits.items():
      if not kept:
        raise CorpusError(
            f"The {name} split is empty ({len(files)} files in all);"
            " add files or change config.data.validation_permille."
        )
    return splits

  def file_counts(self) -> dict[str, int]:
    """How many files matched, how many each split keeps, and how many
    ``max_files`` left out (0 when it keeps them all)."""
    matched = len(self._files())
    counts = {name: len(v) for name, v in self.splits().items()}
    kept = (
        counts[TRAIN]
        if self.builder_config.kind in RECORD_KINDS
        else sum(counts.values())
    )
    return {
        "matched": matched,
        **counts,
        "left_out": matched - kept,
        "max_files": self.builder_config.max_files,
    }

  def _split_generators(self, dl_manager):
    del dl_manager
    root = self._root()
    if self.builder_config.kind in RECORD_KINDS:
      return {
          name: self._generate_records(files, root, name)
          for name, files in self.splits().items()
      }
    generate = (
        self._generate_packages
        if self.builder_config.documents == "package"
        else self._generate_examples
    )
    return {
        name: generate(files, root) for name, files in self.splits().items()
    }

  def _generate_packages(self, files: list[str], root: str) -> Iterator[Any]:
    """A document per package (``package_of``): its files in sorted path
    order, joined by ``package_document``."""

    def order(path: str) -> tuple[str, str]:
      rel = os.path.relpath(path, root)
      return package_of(rel), rel

    texts = self._texts(sorted(files, key=order), root)
    for package, parts in itertools.groupby(texts, lambda p: package_of(p[0])):
      yield package, {"text": package_document(list(parts)), "path": package}

  def _generate_records(
      self, files: list[str], root: str, split: str
  ) -> Iterator[Any]:
    """The records of ``files`` whose key (file and line or row) hashes
    into ``split``, streamed."""
    cfg = self.builder_config
    read = read_jsonl if cfg.kind == "jsonl" else read_parquet
    for path in files:
      rel = os.path.relpath(path, root)
      for index, text in read(path, cfg.text_key):
        key = f"{rel}:{index}"
        if is_validation(key, cfg.validation_permille) == (split == VALIDATION):
          yield key, {"text": text, "path": key}

  def _generate_examples(self, files: list[str], root: str) -> Iterator[Any]:
    for rel, text in self._texts(files, root):
      yield rel, {"text": text, "path": rel}

  def _texts(self, files: list[str], root: str) -> Iterator[tuple[str, str]]:
    """(path relative to ``root``, text) of each file; undecodable bytes are
    replaced, counted and, at the end, warned about once."""
    bad_files, bad_bytes, first_bad = 0, 0, None
    for path in files:
      text, replaced = read_text(path)
      if replaced:
        bad_files, bad_bytes = bad_files + 1, bad_bytes + replaced
        first_bad = first_bad or path
      yield os.path.relpath(path, root), text
    if bad_files:
      logging.warning(
          "%d file(s) had undecodable UTF-8 (%d replacement(s), first: %s);"
          " decoded with U+FFFD.",
          bad_files,
          bad_bytes,
          first_bad,
      )


def read_jsonl(path: str, text_key: str) -> Iterator[tuple[int, str]]:
  """(line number, text) of each record of a JSON-lines file (gzipped when
  its name ends in .gz), one line at a time; blank lines are skipped."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{number} is not JSON ({e.msg}).") from e
      if not isinstance(record, dict) or text_key not in record:
        raise CorpusError(
            f"{path}:{number} has no {text_key!r} field; set"
            " config.data.text_key to the field with the text."
        )
      yield number, str(record[text_key])


def read_parquet(path: str, text_key: str) -> Iterator[tuple[int, str]]:
  """(row number, text) of each row of a Parquet file, a record batch at a
  time."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  try:
    table = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises its own ArrowInvalid and OSError.
    raise CorpusError(f"{path} is not a readable Parquet file: {e}") from e
  if text_key not in table.schema_arrow.names:
    raise CorpusError(
        f"{path} has no column {text_key!r} (it has"
        f" {', '.join(table.schema_arrow.names)}); set config.data.text_key."
    )
  row = 0
  for batch in table.iter_batches(batch_size=1024, columns=[text_key]):
    for value in batch.column(0).to_pylist():
      yield row, "" if value is None else str(value)
      row += 1


class _FileBucket:
  """TFDS's sort bucket (``shuffle._Bucket``: the same file format and
  interface) on plain files, so that sorting on disk needs no TensorFlow
  (TFDS's own goes through ``tf.io.gfile``). Writes are gathered per bucket
  up to ``BUFFER`` bytes, so no bucket holds a file open (and TFDS's 1,000
  buckets hold at most 16 MiB between them)."""

  BUFFER = 16 << 10

  def __init__(self, path):
    self._path = os.fspath(path)
    self._pending: list[bytes] = []
    self._pending_bytes = 0
    self._length = 0
    self._size = 0

  @property
  def size(self) -> int:
    return self._size

  def __len__(self) -> int:
    return self._length

  def add(self, key: int, data: bytes) -> None:
    # pylint: disable-next=protected-access
    record = tfds_shuffle._hkey_to_bytes(key) + struct.pack("=Q", len(data))
    self._pending += [record, data]
    self._pending_bytes += len(record) + len(data)
    self._length += 1
    self._size += len(data)
    if self._pending_bytes >= self.BUFFER:
      self.flush()

  def flush(self) -> None:
    if self._pending:
      os.makedirs(os.path.dirname(self._path), exist_ok=True)
      with open(self._path, "ab") as f:
        f.write(b"".join(self._pending))
      self._pending, self._pending_bytes = [], 0

  def read_values(self) -> Iterator[tuple[int, bytes]]:
    self.flush()
    if not os.path.exists(self._path):
      return
    key_bytes = tfds_shuffle.HKEY_SIZE_BYTES
    with open(self._path, "rb") as f:
      while head := f.read(key_bytes):
        key = tfds_shuffle._read_hkey(head)  # pylint: disable=protected-access
        (size,) = struct.unpack("=Q", f.read(8))
        yield key, f.read(size)

  def del_file(self) -> None:
    if os.path.exists(self._path):
      os.remove(self._path)


@contextlib.contextmanager
def _sort_memory(limit: int) -> Iterator[None]:
  # pylint: disable=protected-access
  previous = tfds_shuffle.MAX_MEM_BUFFER_SIZE, tfds_shuffle._Bucket
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = min(previous[0], limit)
  tfds_shuffle._Bucket = _FileBucket
  try:
    yield
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE, tfds_shuffle._Bucket = previous
  # pylint: enable=protected-access


def build(builder, sort_memory: int = SORT_MEMORY) -> None:
  """Builds the corpus into its data_dir (a no-op when built), holding at
  most ``sort_memory`` bytes of examples in memory while TFDS orders them."""
  with _sort_memory(sort_memory):
    builder.download_and_prepare()


class _CustomConfigNotice(py_logging.Filter):
  """Drops TFDS's "Using custom data configuration ..." warning: every
  corpus here is a custom configuration, so it says nothing."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def _quiet_custom_config() -> Iterator[None]:
  notice = _CustomConfigNotice()
  logging.get_absl_logger().addFilter(notice)
  try:
    yield
  finally:
    logging.get_absl_logger().removeFilter(notice)


def corpus_builder(
    data_config, data_dir: str
) -> tuple[Any, str, dict[str, str]]:
  """The TFDS builder for ``config.data``, its text key and its split names.

  Returns ``(builder, text_key, {"train": ..., "validation": ...})``; the
  builder is not prepared yet.
  """
  source = data_config.source
  if source in ("stdlib", "files") + RECORD_KINDS:
    if source == "stdlib":
      root, pattern = stdlib_root(), ""
      version = f"py{sys.version_info[0]}.{sys.version_info[1]}"
      name = f"stdlib-{version}-n{data_config.max_files}-v{data_config.validation_permille}"
    else:
      if not data_config.files_glob:
        raise CorpusError(
            f"config.data.source={source!r} needs config.data.files_glob"
        )
      root, pattern = "", data_config.files_glob
      key = (
          pattern
          if source == "files"
          else f"{source}:{data_config.text_key}:{pattern}"
      )
      digest = hashlib.sha1(key.encode()).hexdigest()[:10]
      prefix = "files" if source == "files" else source
      name = f"{prefix}-{digest}-n{data_config.max_files}-v{data_config.validation_permille}"
    if data_config.documents not in ("file", "package") or (
        data_config.documents == "package" and source in RECORD_KINDS
    ):
      raise CorpusError(
          f"config.data.documents={data_config.documents!r}: use 'file', or"
          " 'package' with source 'stdlib' or 'files'."
      )
    if data_config.documents == "package":
      name += "-packages"
    config = FilesCorpusConfig(
        name=name,
        version=FilesCorpus.VERSION,
        root=root,
        pattern=pattern,
        max_files=data_config.max_files,
        validation_permille=data_config.validation_permille,
        kind=source if source in RECORD_KINDS else "text",
        documents=data_config.documents,
        text_key=data_config.text_key if source in RECORD_KINDS else "text",
    )
    with _quiet_custom_config():
      builder = FilesCorpus(
          config=config, data_dir=data_dir, file_format="array_record"
      )
    return builder, "text", {TRAIN: TRAIN, VALIDATION: VALIDATION}
  if source == "tfds":
    if not data_config.tfds_name:
      raise CorpusError("config.data.source='tfds' needs config.data.tfds_name")
    builder = tfds.builder(
        data_config.tfds_name, data_dir=data_dir, file_format="array_record"
    )
    return (
        builder,
        data_config.text_key,
        {
            TRAIN: data_config.train_split,
            VALIDATION: data_config.validation_split,
        },
    )
  raise CorpusError(
      f"Unknown config.data.source {source!r}; use 'stdlib', 'files',"
      " 'jsonl', 'parquet' or 'tfds'."
  )


def prepare_corpus(data_config, data_dir: str):
  """Builds the corpus into ``data_dir`` (a no-op when already built)."""
  builder, text_key, splits = corpus_builder(data_config, data_dir)
  build(builder)
  return builder, text_key, splits
