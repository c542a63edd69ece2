"""Hugging Face model directories <-> moejax weights checkpoints, streamed one decoder layer at a time.

`from_hf(hf_dir, out_dir)` reads config.json and the safetensors (one file or shards), makes the
moejax config (`moejax.convert.hf`; a preset of configs/architectures.py when one is the same
model, checked or inferred), and writes into out_dir:
  config.json       the resolved moejax config (as a run's workdir holds it)
  hf_config.json    the source config.json, as it was (to-hf writes it back)
  conversion.json   the source, its files and tensors, the preset, the layers written
  checkpoint/       the weights (`moejax.weights` layout: what a run's checkpoint holds as
                    params and model_state), in the checkpoint's own dtypes
`to_hf(source, out_dir)` is the inverse: a converted model, a run's workdir (its newest or a
chosen step) or one step of a run -> safetensors shards, their index and config.json.

Both hold one decoder layer at a time (the tensors it reads and the arrays it writes), never the
model: the converter's peak memory is about the largest layer, plus one safetensors shard when
writing (`--max_shard_size`). Tensor by tensor would be finer, but a layer's moejax arrays are
built from several tensors (a fused gate_up_proj is two of them; DBRX's Wqkv three).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil

import ml_collections
import numpy as np

from moejax.convert import files, hf
from moejax.convert.hf_config import config_json
from moejax.errors import ConfigError

# Fields a converted config.json sets that say how the model trains, not what it computes: a
# preset may differ in them (its recipe wins).
TRAINING_FIELDS = hf.TRAINING_FIELDS
PRESETS_FILE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "architectures.py"
)


def load_presets(path: str = PRESETS_FILE):
  """The presets module (configs/architectures.py), or None where moejax is installed without configs/."""
  if not os.path.isfile(path):
    return None
  spec = importlib.util.spec_from_file_location("moejax_architecture_presets", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def preset_differences(converted: dict, preset_cfg) -> list[str]:
  """['field: preset value vs config.json value', ...] over the fields that decide the function."""
  out = []
  for field, value in converted.items():
    if field.startswith(TRAINING_FIELDS):
      continue
    section, name = field.split(".")
    ours = preset_cfg[section][name]
    if isinstance(ours, (list, tuple)) or isinstance(value, (list, tuple)):
      same = tuple(ours or ()) == tuple(value or ())
    else:
      same = ours == value
    if not same:
      out.append(f"{field} is {ours!r} in the preset, {value!r} in config.json")
  return out


def resolve_config(hf_config: dict, preset: str | None, presets=None) -> tuple[ml_collections.ConfigDict, str | None]:
  """(the moejax config, the preset's name or None) of a config.json.

  preset: a name in configs/architectures.py that must be this model (ConfigError naming the
  first field that differs), or None to find one (the first preset whose every field that decides
  the function equals config.json's). With a preset, its config is used (its training recipe);
  without, the config config.json gives.
  """
  converted = hf.config_overrides(hf_config)
  presets = load_presets() if presets is None else presets
  if preset is not None:
    if presets is None or preset not in presets.PRESETS:
      known = ", ".join(sorted(presets.PRESETS)) if presets is not None else "none (configs/ is not installed)"
      raise ConfigError("--preset", f"unknown preset {preset!r}; presets: {known}")
    cfg = presets.get_config(preset)
    differ = preset_differences(converted, cfg)
    if differ:
      raise ConfigError("--preset", f"{preset} is not the model in config.json: {differ[0]}")
    return cfg, preset
  if presets is not None:
    for name in presets.PRESETS:
      cfg = presets.get_config(name)
      if not preset_differences(converted, cfg):
        return cfg, name
  return hf.moejax_config(hf_config), None


def _abstract_model(cfg):
  """(params {path: abstract Variable}, other model variables {path: ...}) of the decoder cfg describes."""
  from flax import nnx

  from moejax.models.build import decoder_config
  from moejax.models.decoder import DecoderLM

  model = nnx.eval_shape(lambda: DecoderLM(decoder_config(cfg, 0), rngs=nnx.Rngs(0)))
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  others = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param))))
  return model, params, others


def _part_prefix(part: str, model_type: str, num_layers: int) -> str:
  """The checkpoint's name of a part: 'layer 3' -> model.layers.3 (DBRX: transformer.blocks.3); 'mtp 0' -> layer L."""
  kind, _, index = part.partition(" ")
  if kind == "globals":
    return "the embedding, final norm and head"
  layer = int(index) + (num_layers if kind == "mtp" else 0)
  return f"{'transformer.blocks' if model_type == 'dbrx' else 'model.layers'}.{layer}"


def from_hf(hf_dir: str, out_dir: str, preset: str | None = None, without_mtp: bool = False, say=print) -> dict:
  """Converts the Hugging Face model in hf_dir into out_dir (which must not exist); returns the report.

  without_mtp: convert the main model only (model.mtp_depth 0), leaving out DeepSeek-V3's
  multi-token-prediction module (layers L.. of the checkpoint) if it holds one (transformers'
  state dicts never do).

  Raises ConfigError (one line naming the key, tensor or file) for a config.json moejax does not
  model, a preset that is not this model, a missing, unexpected or misshapen tensor, an unloadable
  dtype, or a file safetensors cannot read. out_dir is left as it was on any error.
  """
  from moejax import weights as weights_lib

  hf_config = files.read_config(hf_dir)
  cfg, preset_name = resolve_config(hf_config, preset)
  model_type = hf_config["model_type"]
  checkpoint = files.HFCheckpoint(hf_dir)
  say(
    f"source: {hf_dir} ({model_type}, {len(checkpoint)} tensors in {len(checkpoint.files)} file(s)); "
    + (f"preset {preset_name}" if preset_name else "no preset of configs/architectures.py is this model")
  )
  tensors = checkpoint
  if without_mtp:
    if not cfg.model.mtp_depth:
      raise ConfigError("--without_mtp", "the model has no multi-token-prediction module (config.json sets none)")
    mtp = [name for name in checkpoint if (hf.layer_index(name) or 0) >= cfg.model.num_layers]
    cfg.model.mtp_depth = 0
    tensors = hf.subset(checkpoint, [name for name in checkpoint if name not in set(mtp)])
    say(f"without the multi-token-prediction module: model.mtp_depth 0, {len(mtp)} of its tensors left out")
  model, params, others = _abstract_model(cfg)
  with _building(out_dir) as tmp:
    writer = weights_lib.PartWriter(tmp)
    written, dtypes, parts = set(), {}, 0
    for part, arrays in hf.iter_hf_to_moejax(tensors, model.cfg, model_type):
      part_params, part_state = {}, {}
      for path, array in arrays.items():
        target = params.get(path, others.get(path))
        if target is None:
          raise ConfigError(f"parameter {weights_lib.dotted(path)}", "does not exist in the moejax model")
        want = tuple(target.get_value().shape)
        if tuple(array.shape) != want:
          raise ConfigError(
            f"tensors of {_part_prefix(part, model_type, cfg.model.num_layers)}",
            f"give parameter {weights_lib.dotted(path)} shape {tuple(array.shape)}; config.json's sizes make it {want}",
          )
        array = np.asarray(array)
        dtypes[str(array.dtype)] = dtypes.get(str(array.dtype), 0) + array.size
        (part_params if path in params else part_state)[path] = array
        written.add(path)
      writer.add(part_params, part_state)
      parts += 1
      del arrays, part_params, part_state
    # The architecture chooses experts without a balancing bias (DeepSeek-V2): a zero bias is its function.
    defaults = hf.absent_defaults({p: v.get_value().shape for p, v in {**params, **others}.items()}, model_type)
    defaults = {p: v for p, v in defaults.items() if p not in written}
    writer.add({p: v for p, v in defaults.items() if p in params}, {p: v for p, v in defaults.items() if p in others})
    written |= set(defaults)
    missing = sorted(set(params) - written, key=str) + sorted(set(others) - written, key=str)
    if missing:
      raise ConfigError(f"parameter {weights_lib.dotted(missing[0])}", "has no tensor in the checkpoint")
    writer.finalize()
    report = {
      "source": os.path.abspath(hf_dir),
      "model_type": model_type,
      "files": checkpoint.files,
      "tensors": len(tensors),
      "preset": preset_name,
      "without_mtp": without_mtp,
      "parts_written": parts,
      "elements_by_dtype": dtypes,
    }
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "hf_config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    with open(os.path.join(tmp, "conversion.json"), "w") as f:
      json.dump(report, f, indent=2)
  return report


@contextlib.contextmanager
def _building(out_dir: str):
  """Yields <out_dir>.partial to write into; renamed to out_dir when the block succeeds, removed when it fails."""
  tmp = f"{out_dir.rstrip(os.sep)}.partial"
  if os.path.exists(tmp):
    raise ConfigError("--out", f"{tmp!r} exists (an interrupted conversion?); remove it first")
  os.makedirs(tmp)
  try:
    yield tmp
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _source_configs(source: str, hf_config_path: str | None) -> tuple[ml_collections.ConfigDict, dict]:
  """(the moejax config, the transformers config.json dict, or None where neither the source nor a
  converted model it started from has one and --hf_config is not given) of a weights source."""
  from moejax.config import saved_config

  root = source
  if os.path.basename(os.path.normpath(source)).isdigit() and os.path.isdir(os.path.join(source, "default")):
    root = os.path.dirname(os.path.dirname(os.path.normpath(source)))  # <workdir>/checkpoints/<step>
  path = os.path.join(root, "config.json")
  if not os.path.isfile(path):
    raise ConfigError("--checkpoint", f"{root!r} holds no config.json (a run's workdir and a converted model do)")
  cfg = saved_config(path)
  if cfg.task != "lm":
    raise ConfigError("--checkpoint", f"{root!r} holds a {cfg.task} model; only decoder LMs convert to transformers")
  hf_path = hf_config_path or os.path.join(root, "hf_config.json")
  started_from = cfg.init.checkpoint and os.path.join(cfg.init.checkpoint, "hf_config.json")
  if not hf_config_path and not os.path.isfile(hf_path) and started_from and os.path.isfile(started_from):
    hf_path = started_from  # A run started from a converted model (init.checkpoint): that model's config.json.
  if not os.path.isfile(hf_path):
    return cfg, None  # Written from the moejax config (`hf_config.config_json`), once the vocabulary is known.
  return cfg, _json(hf_path)


class _Reads(dict):
  """A dict that remembers which keys were read (`read`)."""

  def __init__(self, *args):
    super().__init__(*args)
    self.read = set()

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)

  def get(self, key, default=None):
    if key in self:
      self.read.add(key)
    return super().get(key, default)


def _json(path: str) -> dict:
  """A transformers config.json (a JSON object with a model_type) at `path`."""
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"file {path}", f"is not readable JSON ({type(e).__name__}: {e})") from None
  if not isinstance(config, dict) or "model_type" not in config:
    raise ConfigError(f"file {path}", "is not a transformers config.json (a JSON object with a model_type)")
  return config


def to_hf(
  source: str,
  out_dir: str,
  step: int | None = None,
  dtype: str | None = None,
  max_shard_bytes: int = 5 * 10**9,
  hf_config_path: str | None = None,
  say=print,
) -> dict:
  """Writes the weights of `source` as a transformers model directory out_dir (which must not exist).

  source: a converted model, a run's workdir (its newest checkpoint, or `step`) or one step of a
  run. dtype: 'float32' | 'bfloat16' | None (the checkpoint's). The config.json written is the
  source's transformers config (hf_config.json, or `hf_config_path`), checked to describe the
  same model as the source's moejax config. Returns the report; ConfigError names what is wrong.
  """
  import jax

  from moejax import weights as weights_lib

  item_dir, description = weights_lib.item_directory(source, step, fields=("--checkpoint", "--step"))
  cfg, hf_config = _source_configs(source, hf_config_path)
  saved = weights_lib.metadata(item_dir, field="--checkpoint")
  if hf_config is None:  # From the moejax config alone; the vocabulary a run took from its data is the embedding's.
    if not cfg.model.vocab_size and ("embed", "embedding") in saved["params"]:
      cfg.model.vocab_size = saved["params"][("embed", "embedding")][0][0]
    hf_config = config_json(cfg)
    say(f"config.json written from the moejax config: a {hf_config['model_type']} model")
  model_type = hf.architecture(hf_config).model_type
  converted = hf.config_overrides(hf_config)
  if converted.get("model.mtp_depth") and not cfg.model.mtp_depth:
    # Converted --without_mtp: the main model, as transformers' state dicts hold DeepSeek-V3 (it drops the module).
    say("the model has no multi-token-prediction module: the checkpoint written holds the main model")
    del converted["model.mtp_depth"]
  differ = preset_differences(converted, cfg)
  if differ:
    raise ConfigError("--hf_config", f"describes another model than {source}: {differ[0]}")
  model, params, others = _abstract_model(cfg)
  for section, variables in (("params", params), ("model_state", others)):
    for path, variable in variables.items():
      got = saved[section].get(weights_lib.key(path))
      if got is None:
        raise ConfigError(f"parameter {weights_lib.dotted(path)}", f"is not in {description}")
      if got[0] != tuple(variable.get_value().shape):
        raise ConfigError(
          f"parameter {weights_lib.dotted(path)}",
          f"has shape {got[0]} in {description}; its config.json makes it {tuple(variable.get_value().shape)}",
        )
  out_dtype = None if dtype is None else files._numpy_dtype(dtype)
  cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  say(f"source: {description} ({model_type}); writing {out_dir}")
  with _building(out_dir) as tmp:
    writer = files.ShardWriter(tmp, max_shard_bytes)
    tensors = 0
    for part, prefix in hf.export_parts(model.cfg):
      targets = {  # This part's arrays only, on one CPU device (host memory).
        section: {
          path: jax.ShapeDtypeStruct(tuple(v.get_value().shape), saved[section][weights_lib.key(path)][1], sharding=cpu)
          for path, v in variables.items()
          if path[: len(prefix)] == prefix
        }
        for section, variables in (("params", params), ("model_state", others))
      }
      restored = weights_lib.restore(item_dir, targets, field="--checkpoint", saved=saved)
      flat = _Reads({path: np.asarray(a) for section in restored.values() for path, a in section.items()})
      exported = hf.export_part(flat, part, model.cfg, model_type)
      left = {p: dict.__getitem__(flat, p) for p in set(flat) - flat.read}
      absent = hf.absent_defaults({p: np.shape(a) for p, a in left.items()}, model_type)
      unread = sorted(p for p, a in left.items() if not (p in absent and np.array_equal(a, absent[p])))
      if unread:  # An array the architecture has no tensor for (e.g. a balancing bias DeepSeek-V2 lacks).
        raise ConfigError(
          f"parameter {weights_lib.dotted(unread[0])}",
          f"has no tensor in a {model_type} checkpoint: transformers would compute without it",
        )
      for name, tensor in exported.items():
        tensor = np.asarray(tensor)
        writer.add(name, tensor if out_dtype is None else tensor.astype(out_dtype))
        tensors += 1
      del restored, flat
    written = writer.close()
    config = dict(hf_config)
    if dtype is not None:
      config["dtype"] = dtype
      if "torch_dtype" in config:  # Older transformers read this name; both must say the same.
        config["torch_dtype"] = dtype
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
  return {"source": description, "model_type": model_type, "files": written, "tensors": tensors}
