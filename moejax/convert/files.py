"""Hugging Face model directories on disk: config.json and safetensors, read lazily and written in shards.

A model directory holds `config.json` and its weights as one `model.safetensors` or as shards
listed by `model.safetensors.index.json` ({"weight_map": {tensor: shard file}}). `HFCheckpoint`
is a read-only Mapping {tensor name: numpy array} over such a directory that reads a tensor only
when asked for it (safetensors' `safe_open` maps the file and copies out that one tensor), so a
converter that asks layer by layer holds one layer, never the model. `ShardWriter` is the other
direction: tensors go into shards of at most `max_shard_bytes`, each tensor's bytes written to
disk as it comes, then the index. bfloat16 arrays are numpy arrays of `ml_dtypes.bfloat16`, which safetensors reads and
writes without torch.

Every problem with the files is a ConfigError naming the file or tensor: no config.json, no
weights, an index naming a shard that is not there, a file that safetensors cannot read (a
truncated or garbled header or data), a tensor in two shards, a dtype moejax does not load
(FP8 and integer weights: DeepSeek-V3's FP8 release must be cast to bfloat16 first).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping

import numpy as np

from moejax.errors import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The dtypes a checkpoint's weights may have (safetensors' names) and the numpy dtype each reads as.
LOADABLE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def read_config(model_dir: str) -> dict:
  """The directory's config.json as a dict."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError("--hf_dir", f"{model_dir!r} holds no config.json (a Hugging Face model directory has one)")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"file {path}", f"is not readable JSON ({type(e).__name__}: {e})") from None
  if not isinstance(config, dict):
    raise ConfigError(f"file {path}", "does not hold a JSON object")
  return config


class HFCheckpoint(Mapping):
  """The tensors of a Hugging Face model directory, {name: numpy array}, each read when asked for.

  Opening reads only the headers (names, dtypes, shapes) and checks them: every shard the index
  names exists and is a readable safetensors file holding what the index says, no tensor is in
  two files, every dtype is loadable. `shape(name)` and `nbytes(name)` need no data.
  """

  def __init__(self, model_dir: str):
    from safetensors import SafetensorError, safe_open

    self.model_dir = model_dir
    single, index = os.path.join(model_dir, SINGLE_FILE), os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"file {index}", f"is not a safetensors index ({type(e).__name__}: {e})") from None
      if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
      ):
        raise ConfigError(f"file {index}", "is not a safetensors index (its weight_map must map tensor names to files)")
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
      weight_map, files = None, [SINGLE_FILE]
    else:
      raise ConfigError("--hf_dir", f"{model_dir!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    self._file_of: dict[str, str] = {}
    self._info: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
      path = os.path.join(model_dir, file)
      if not os.path.isfile(path):
        raise ConfigError(f"file {path}", f"is listed in {INDEX_FILE} but does not exist")
      try:
        with safe_open(path, framework="numpy") as f:
          for name in f.keys():
            if name in self._file_of:
              raise ConfigError(f"tensor {name}", f"is in both {self._file_of[name]} and {file}")
            tensor = f.get_slice(name)
            self._file_of[name], self._info[name] = file, (tensor.get_dtype(), tuple(tensor.get_shape()))
      except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, ConfigError):
          raise
        raise ConfigError(f"file {path}", f"is not a readable safetensors file ({_first_line(e)})") from None
    if weight_map is not None:
      for name, file in weight_map.items():
        if self._file_of.get(name) != file:
          where = f"is in {self._file_of[name]}" if name in self._file_of else "is in no shard"
          raise ConfigError(f"tensor {name}", f"{INDEX_FILE} puts it in {file}, but it {where}")
      extra = sorted(set(self._file_of) - set(weight_map))
      if extra:
        raise ConfigError(f"tensor {extra[0]}", f"is in {self._file_of[extra[0]]} but not in {INDEX_FILE}")
    for name, (dtype, _) in self._info.items():
      if dtype not in LOADABLE_DTYPES:
        raise ConfigError(
          f"tensor {name}",
          f"has dtype {dtype}; moejax loads {', '.join(LOADABLE_DTYPES)} (cast FP8 or quantised weights first)",
        )
    self.files = files

  def __getitem__(self, name: str) -> np.ndarray:
    from safetensors import SafetensorError, safe_open

    file = self._file_of[name]  # KeyError for an unknown name, as a Mapping does.
    path = os.path.join(self.model_dir, file)
    try:
      with safe_open(path, framework="numpy") as f:
        return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
      raise ConfigError(f"tensor {name}", f"cannot be read from {path} ({_first_line(e)})") from None

  def __iter__(self) -> Iterator[str]:
    return iter(self._file_of)

  def __len__(self) -> int:
    return len(self._file_of)

  def __contains__(self, name) -> bool:
    return name in self._file_of

  def shape(self, name: str) -> tuple[int, ...]:
    return self._info[name][1]

  def dtype(self, name: str) -> np.dtype:
    return _numpy_dtype(LOADABLE_DTYPES[self._info[name][0]])

  def nbytes(self, name: str) -> int:
    return int(np.prod(self.shape(name), dtype=np.int64)) * self.dtype(name).itemsize


def _numpy_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


def parse_size(text: str) -> int:
  """'5GB', '500MB', '2GiB' or a number of bytes -> bytes (decimal units as transformers counts)."""
  units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
  upper = str(text).strip().upper()
  for unit, factor in units.items():
    if upper.endswith(unit):
      number = upper[: -len(unit)].strip()
      break
  else:
    number, factor = upper, 1
  try:
    value = float(number) * factor
  except ValueError:
    value = float("nan")
  if not math.isfinite(value):
    raise ConfigError("--max_shard_size", f"{text!r} is not a size (e.g. 5GB, 500MB, 2GiB)")
  if value < 1:
    raise ConfigError("--max_shard_size", f"{text!r} must be at least one byte")
  return int(value)


# numpy dtype -> safetensors' name, for the dtypes a moejax checkpoint holds.
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int32": "I32"}


class ShardWriter:
  """Writes tensors into safetensors shards of at most max_shard_bytes (a larger tensor gets a shard of its own).

  Streaming: `add(name, array)` appends the array's bytes to the current shard's data file on disk
  at once and keeps only its name, dtype and shape, so the writer holds no tensor. A shard is
  finished when the next tensor would overflow it: its header (safetensors' layout: an 8-byte
  little-endian length, the JSON header padded to 8 bytes, then the data) is written and the data
  copied after it in chunks. safetensors' own writer needs the whole shard in memory, hence this.
  `close()` finishes the last shard and, with more than one, names them
  model-0000i-of-0000n.safetensors and writes model.safetensors.index.json (one shard:
  model.safetensors). Returns the files written.
  """

  def __init__(self, out_dir: str, max_shard_bytes: int, metadata: dict | None = None):
    self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
    self.metadata = {"format": "pt", **(metadata or {})}  # transformers' loader expects format pt.
    self._names: set[str] = set()
    self._entries: dict[str, dict] = {}  # The current shard's header entries.
    self._data = None  # Its data file, open for appending.
    self._size = 0
    self._written: list[tuple[str, list[str], int]] = []  # (temporary file, names, bytes)

  def add(self, name: str, array: np.ndarray) -> None:
    if name in self._names:
      raise ValueError(f"tensor {name} written twice")
    array = np.ascontiguousarray(array)
    dtype = _SAFETENSORS_DTYPES.get(array.dtype.name)
    if dtype is None:
      raise ValueError(f"tensor {name}: dtype {array.dtype} has no safetensors writer here")
    if self._entries and self._size + array.nbytes > self.max_shard_bytes:
      self._finish_shard()
    if self._data is None:
      self._data = open(os.path.join(self.out_dir, f".shard-{len(self._written):05d}.data.tmp"), "wb")
    self._data.write(memoryview(array.view(np.uint8).reshape(-1)))  # The bytes as they lie, no copy.
    self._entries[name] = {
      "dtype": dtype,
      "shape": list(array.shape),
      "data_offsets": [self._size, self._size + array.nbytes],
    }
    self._size += array.nbytes
    self._names.add(name)

  def _finish_shard(self) -> None:
    import shutil

    if self._data is None:  # An empty model: one empty shard.
      self._data = open(os.path.join(self.out_dir, f".shard-{len(self._written):05d}.data.tmp"), "wb")
    data_path = self._data.name
    self._data.close()
    header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path = os.path.join(self.out_dir, f".shard-{len(self._written):05d}.safetensors.tmp")
    with open(path, "wb") as out, open(data_path, "rb") as data:
      out.write(len(header).to_bytes(8, "little"))
      out.write(header)
      shutil.copyfileobj(data, out, 64 * 2**20)
    os.remove(data_path)
    self._written.append((path, list(self._entries), self._size))
    self._entries, self._data, self._size = {}, None, 0

  def close(self) -> list[str]:
    if self._entries or not self._written:
      self._finish_shard()
    n = len(self._written)
    if n == 1:
      os.replace(self._written[0][0], os.path.join(self.out_dir, SINGLE_FILE))
      return [SINGLE_FILE]
    weight_map, written, total = {}, [], 0
    for i, (path, names, nbytes) in enumerate(self._written):
      file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      os.replace(path, os.path.join(self.out_dir, file))
      weight_map.update({name: file for name in names})
      written.append(file)
      total += nbytes
    with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return written + [INDEX_FILE]
