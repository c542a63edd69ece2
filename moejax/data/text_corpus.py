"""A byte-level language-modelling corpus made of text files on this machine.

Real text without a download: by default, the `*.py` files of the Python
standard library that runs this code. Every run can record the manifest (each
file's relative path, size and sha256) and its digest, so a result says
exactly what it was trained on.

Decisions, all deterministic and independent of where the files live:
  * Default corpus: `*.py` under `sysconfig.get_paths()['stdlib']`, skipping
    `site-packages`/`dist-packages` (installed packages, not the stdlib, and
    different on every machine) and the test directories (`test`, `tests`,
    `idle_test`: about a third of the bytes, full of generated or deliberately
    odd data).
  * Size cap: files are visited in a pseudo-random order (sha256 of their
    relative path) and each one is kept if it still fits in `max_bytes`, so a
    capped corpus is a spread-out sample of packages, not the alphabetically
    first ones.
  * Split by file: a file is in validation when sha256('split:' + path) is 0
    mod 20 (about 5%). If that leaves validation empty and there are at least
    two files, the file with the smallest such hash goes to validation.
  * Tokens are bytes (vocabulary 256). Each split concatenates its files in
    manifest order, each followed by a 0 byte (never found in source code;
    it marks the document boundary), and cuts the result into non-overlapping
    sequences of `length` bytes, dropping the ragged tail.
  * The digest is sha256 over the JSON of [(path, bytes, sha256)] in manifest
    order: the same content gives the same digest on any machine.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import sysconfig
from typing import Sequence

import numpy as np

DEFAULT_MAX_BYTES = 8 * 2**20
SEPARATOR = 0  # Byte written after every file.
VALIDATION_MODULUS = 20
STDLIB = "<stdlib>"  # How the default root is recorded in manifests.
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What a corpus is made of.

  Attributes:
    files: one dict per file, sorted by path: `path` (relative to its root,
      '/'-separated), `bytes`, `sha256` (hex) and `split` ('train' or
      'validation').
    digest: sha256 hex of the (path, bytes, sha256) list; identifies the corpus.
    roots: the roots as given (STDLIB for the default), for the record only.
    local_paths: absolute path of each file on this machine, parallel to
      `files`; not part of the digest nor of the JSON.
  """

  files: list[dict]
  digest: str
  roots: list[str]
  local_paths: list[str]

  def to_json_dict(self) -> dict:
    """What a run records: everything but the machine-specific local paths."""
    return {
      "digest": self.digest,
      "roots": self.roots,
      "num_files": len(self.files),
      "num_bytes": sum(f["bytes"] for f in self.files),
      "python": sys.version.split()[0],
      "files": self.files,
    }


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  """Byte sequences of both splits, and the manifest they came from.

  Attributes:
    manifest: see `Manifest`.
    train: <uint8>[N_train, length].
    validation: <uint8>[N_validation, length].
  """

  manifest: Manifest
  train: np.ndarray
  validation: np.ndarray


def collect_files(paths: Sequence[str] | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Manifest:
  """Lists, selects and hashes the files of a corpus.

  Args:
    paths: files, directories (all regular files below them, hidden ones
      skipped) or glob patterns (`**` allowed). A file's relative path starts
      with the name of the directory it was found in (the directory itself for
      a directory, the pattern's fixed prefix for a glob), so that two roots
      rarely collide. None or empty: the standard library (see module doc).
    max_bytes: cap on the total size of the selected files (see module doc).

  Returns:
    The Manifest of the selected files.

  Raises:
    ValueError: if nothing matches, or two files get the same relative path.
  """
  if paths:
    roots = [str(p) for p in paths]
    found = [f for p in roots for f in _expand(p)]
  else:
    roots = [STDLIB]
    found = _stdlib_files()
  if not found:
    raise ValueError(f"No files found for data.text.paths={paths!r}")
  by_path = {}
  for rel, local in found:
    if rel in by_path and by_path[rel] != local:
      raise ValueError(f"Two files have the relative path {rel!r}: {by_path[rel]} and {local}")
    by_path[rel] = local

  # Greedy fill of the byte budget in a fixed pseudo-random order of files.
  sizes = {rel: os.path.getsize(local) for rel, local in by_path.items()}
  selected, total = [], 0
  for rel in sorted(by_path, key=lambda r: _path_hash("order", r)):
    if total + sizes[rel] <= max_bytes:
      selected.append(rel)
      total += sizes[rel]
  selected.sort()
  if not selected:
    raise ValueError(f"No file fits in max_bytes={max_bytes} for {roots}")

  split_hash = {rel: _path_hash("split", rel) for rel in selected}
  validation = {r for r in selected if split_hash[r] % VALIDATION_MODULUS == 0}
  if not validation and len(selected) >= 2:
    validation = {min(selected, key=split_hash.__getitem__)}

  files, local_paths = [], []
  for rel in selected:
    with open(by_path[rel], "rb") as f:
      content = f.read()
    files.append(
      {
        "path": rel,
        "bytes": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
        "split": "validation" if rel in validation else "train",
      }
    )
    local_paths.append(by_path[rel])
  return Manifest(files=files, digest=manifest_digest(files), roots=roots, local_paths=local_paths)


def manifest_digest(files: Sequence[dict]) -> str:
  """sha256 hex over the (path, bytes, sha256) of `files`, in order."""
  key = [(f["path"], f["bytes"], f["sha256"]) for f in files]
  return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def load_text_corpus(
  paths: Sequence[str] | None = None,
  *,
  length: int,
  max_bytes: int = DEFAULT_MAX_BYTES,
  manifest: Manifest | None = None,
) -> TextCorpus:
  """Reads the corpus and cuts each split into byte sequences.

  Args:
    paths: as in `collect_files`.
    length: bytes per sequence (a language model of input length L needs L+1).
    max_bytes: as in `collect_files`.
    manifest: reuse an already collected manifest instead of `paths`.

  Returns:
    A TextCorpus; the files are re-hashed while read, so the sequences match
    the manifest's digest.

  Raises:
    ValueError: if a file changed since it was hashed, or a split is too
      short for one sequence.
  """
  if manifest is None:
    manifest = collect_files(paths, max_bytes=max_bytes)
  contents = {"train": [], "validation": []}
  for info, local in zip(manifest.files, manifest.local_paths):
    with open(local, "rb") as f:
      content = f.read()
    if hashlib.sha256(content).hexdigest() != info["sha256"]:
      raise ValueError(f"{local} changed while the corpus was being read")
    contents[info["split"]].append(content)
  splits = {split: pack_bytes(docs, length) for split, docs in contents.items()}
  for split, rows in splits.items():
    if not len(rows):
      raise ValueError(
        f"The {split} split of {manifest.roots} holds less than one sequence "
        f"of {length} bytes; add files or raise data.text.max_bytes."
      )
  return TextCorpus(manifest=manifest, **splits)


def pack_bytes(documents: Sequence[bytes], length: int) -> np.ndarray:
  """Concatenates documents, each followed by SEPARATOR, into rows.

  Args:
    documents: byte strings.
    length: bytes per row.

  Returns:
    <uint8>[N, length] with N = total // length; the ragged tail is dropped.
  """
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}")
  stream = b"".join(d + bytes([SEPARATOR]) for d in documents)
  num_rows = len(stream) // length
  flat = np.frombuffer(stream, np.uint8, count=num_rows * length)
  return flat.reshape(num_rows, length).copy()


def _path_hash(salt: str, rel: str) -> int:
  """A stable integer hash of a relative path."""
  return int(hashlib.sha256(f"{salt}:{rel}".encode()).hexdigest()[:16], 16)


def _stdlib_files() -> list[tuple[str, str]]:
  """(relative path, local path) of the standard library's *.py files."""
  root = sysconfig.get_paths()["stdlib"]
  return [(rel, local) for rel, local in _walk(root, prefix="", skip_dirs=_SKIPPED_STDLIB_DIRS) if rel.endswith(".py")]


def _expand(path: str) -> list[tuple[str, str]]:
  """(relative path, local path) of the files a user's path stands for."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    root = os.path.abspath(path)
    return _walk(root, prefix=os.path.basename(root))
  if os.path.isfile(path):
    return [(os.path.basename(path), os.path.abspath(path))]
  # A glob: relative paths start at the last directory before the first magic.
  parts = path.split(os.sep)
  fixed = []
  for part in parts:
    if glob.has_magic(part):
      break
    fixed.append(part)
  base = os.path.abspath(os.sep.join(fixed) or ".")
  prefix_root = os.path.dirname(base)
  out = []
  for match in sorted(glob.glob(path, recursive=True)):
    if os.path.isfile(match):
      local = os.path.abspath(match)
      out.append((os.path.relpath(local, prefix_root).replace(os.sep, "/"), local))
  return out


def _walk(root: str, prefix: str, skip_dirs: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
  """Regular, non-hidden files below root, without following links."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
    for name in sorted(filenames):
      local = os.path.join(dirpath, name)
      if name.startswith(".") or not os.path.isfile(local):
        continue
      rel = os.path.relpath(local, root).replace(os.sep, "/")
      out.append((f"{prefix}/{rel}" if prefix else rel, local))
  return out
