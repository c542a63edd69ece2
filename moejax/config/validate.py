"""Start-up validation of a config, section by section; each router family validates its own options.

`validate` raises a `ConfigError` naming the first bad field and what is allowed; `moejax.main`
turns that into one line on stderr and exit code 2. Pure Python apart from one backend query.
"""

from __future__ import annotations

import re

import ml_collections

from moejax import distributed, routers
from moejax.config import schema
from moejax.data.config import SOURCES
from moejax.errors import ConfigError


def validate(cfg: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
  """Raises ConfigError for the first inconsistent or malformed field (num_devices over all processes)."""
  _check(
    "task" in cfg and cfg.task in schema.TASKS,
    "task",
    "must be 'lm' or 'vit' (start config files from moejax.config.base_config(task))",
  )
  _check_keys(cfg, schema.base_config(cfg.task))
  _model(cfg)
  _moe(cfg)
  refuse_inactive(cfg)
  _train(cfg)
  _init(cfg)
  _optim(cfg)
  _lora(cfg)
  _data(cfg)
  distributed.check(cfg)
  _mesh(cfg, num_devices, num_processes)


def refuse_inactive(cfg: ml_collections.ConfigDict) -> None:
  """A field that the run would not read (schema.inactive_fields), set away from its default, is refused."""
  defaults = schema.flatten(schema.base_config(cfg.task))
  flat = schema.flatten(cfg)
  for field, why in schema.inactive_fields(cfg).items():
    if flat[field] != defaults[field]:
      raise ConfigError(field, f"is not used here ({why}); remove the setting, or select what reads it")


def _model(cfg) -> None:
  m, lm = cfg.model, cfg.task == "lm"
  _positive(cfg, "model.num_layers", "model.d_model", "model.num_heads", "model.d_ff", "model.init_scale")
  _positive(cfg, "model.moe_every", allow_zero=True)
  _check(
    m.moe_every <= m.num_layers,
    "model.moe_every",
    f"must be <= model.num_layers ({m.num_layers}) or 0 for a dense model, got {m.moe_every}",
  )
  if lm:
    _positive(cfg, "model.vocab_size", "model.num_kv_heads", "model.head_dim", allow_zero=True)
    _check(
      m.num_kv_heads == 0 or m.num_heads % m.num_kv_heads == 0,
      "model.num_kv_heads",
      f"must divide num_heads ({m.num_heads}), or be 0 (= num_heads); got {m.num_kv_heads}",
    )
    _one_of(cfg, "model.qk_norm_scope", schema.QK_NORM_SCOPES)
    _one_of(cfg, "model.attention_bias", schema.ATTENTION_BIASES)
    _check(
      isinstance(m.rope_theta, (int, float)) and m.rope_theta > 1,
      "model.rope_theta",
      f"must be a number > 1 (the RoPE base), got {m.rope_theta!r}",
    )
    _attention(cfg)
    _one_of(cfg, "model.norm", schema.NORMS)
    for name in ("clip_qkv", "attention_softcap"):
      value = m[name]
      _check(
        isinstance(value, (int, float)) and value >= 0,
        f"model.{name}",
        f"must be a number >= 0 (0: off), got {value!r}",
      )
    _positive(cfg, "model.parallel_dense_d_ff", allow_zero=True)
    for name in ("embed_multiplier", "output_multiplier"):
      value = m[name]
      _check(isinstance(value, (int, float)) and value > 0, f"model.{name}", f"must be a number > 0, got {value!r}")
    _positive(cfg, "model.mtp_depth", "model.mtp_loss_weight", allow_zero=True)
    dense = m.dense_layers
    _check(
      isinstance(dense, (tuple, list))
      and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < m.num_layers for i in dense)
      and len(set(dense)) == len(dense),
      "model.dense_layers",
      f"must be distinct block indices in [0, model.num_layers = {m.num_layers}), got {dense!r}",
    )
  else:
    _positive(cfg, "model.patch_size")
    _positive(cfg, "model.moe_last", allow_zero=True)
    _check(m.moe_last <= m.num_layers, "model.moe_last", f"must be <= model.num_layers ({m.num_layers})")
    _check(not (m.moe_last and m.moe_every), "model.moe_last", "set model.moe_every or model.moe_last, not both")
    _one_of(cfg, "model.pooling", schema.POOLINGS)
  head_dim = m.head_dim if lm and m.head_dim else None
  _check(
    head_dim or m.d_model % m.num_heads == 0 or (lm and m.attention == "mla"),
    "model.num_heads",
    f"d_model ({m.d_model}) must be divisible by num_heads ({m.num_heads}) unless model.head_dim is set",
  )
  if lm:
    head_dim = head_dim or m.d_model // m.num_heads
    _check(
      m.positions != "rope" or m.attention == "mla" or head_dim % 2 == 0,
      "model.positions",
      f"'rope' needs an even head dim, got {head_dim}",
    )
    _one_of(cfg, "model.positions", schema.POSITIONS)
  _one_of(cfg, "model.activation", schema.ACTIVATIONS)
  _one_of(cfg, "model.dtype", schema.DTYPES)
  _one_of(cfg, "model.remat", schema.REMAT_POLICIES)
  _check(
    m.remat != "moe" or schema.has_moe_layers(cfg),
    "model.remat",
    "'moe' rematerialises inside the MoE layers, and this model has none ('full' or 'dots' do the blocks)",
  )
  _check(isinstance(m.scan_layers, bool), "model.scan_layers", f"must be True or False, got {m.scan_layers!r}")
  _check(
    isinstance(m.norm_eps, (int, float)) and 0 < m.norm_eps < 1,
    "model.norm_eps",
    f"must be in (0, 1) (the RMSNorm epsilon), got {m.norm_eps!r}",
  )


def _attention(cfg) -> None:
  """model.attention and the fields of its kind, model.rope_scaling and YaRN's fields."""
  m = cfg.model
  _one_of(cfg, "model.attention", tuple(schema.ATTENTION_OPTIONS))
  _positive(cfg, "model.sliding_window", "model.full_attention_every", allow_zero=True)
  _check(
    isinstance(m.attention_sinks, bool), "model.attention_sinks", f"must be True or False, got {m.attention_sinks!r}"
  )
  _check(
    isinstance(m.rope_interleaved, bool), "model.rope_interleaved", f"must be True or False, got {m.rope_interleaved!r}"
  )
  if m.attention == "mla":
    _positive(cfg, "model.kv_lora_rank", "model.qk_rope_head_dim", "model.v_head_dim")
    _positive(cfg, "model.q_lora_rank", "model.qk_nope_head_dim", allow_zero=True)
    _check(
      m.qk_rope_head_dim % 2 == 0,
      "model.qk_rope_head_dim",
      f"must be even (RoPE turns pairs), got {m.qk_rope_head_dim}",
    )
    _check(m.positions == "rope", "model.positions", "model.attention 'mla' is built around RoPE: set 'rope'")
  _one_of(cfg, "model.rope_scaling", schema.ROPE_SCALINGS)
  if m.rope_scaling == "yarn":
    _check(
      isinstance(m.yarn_factor, (int, float)) and m.yarn_factor >= 1,
      "model.yarn_factor",
      f"must be a number >= 1 (the context extension), got {m.yarn_factor!r}",
    )
    _positive(cfg, "model.yarn_original_max_len")
    for name in ("yarn_beta_fast", "yarn_beta_slow"):
      value = m[name]
      _check(isinstance(value, (int, float)) and value > 0, f"model.{name}", f"must be a number > 0, got {value!r}")
    _check(
      m.yarn_beta_fast > m.yarn_beta_slow,
      "model.yarn_beta_fast",
      f"must exceed model.yarn_beta_slow ({m.yarn_beta_slow}), got {m.yarn_beta_fast}",
    )
    _check(isinstance(m.yarn_truncate, bool), "model.yarn_truncate", f"must be True or False, got {m.yarn_truncate!r}")
    for name in ("yarn_mscale", "yarn_mscale_all_dim", "yarn_attention_factor"):
      value = m[name]
      _check(
        isinstance(value, (int, float)) and value >= 0,
        f"model.{name}",
        f"must be a number >= 0 (0: unset), got {value!r}",
      )


def _moe(cfg) -> None:
  e = cfg.moe
  has_moe = schema.has_moe_layers(cfg)
  family = routers.get(e.router)  # ConfigError naming moe.router if unknown.
  _check(e.num_experts >= 1, "moe.num_experts", f"must be >= 1, got {e.num_experts}")
  _positive(cfg, "moe.dead_expert_steps")
  _positive(cfg, "moe.d_expert", "moe.group_size", "moe.num_shared_experts", allow_zero=True)
  _one_of(cfg, "moe.shared_expert_gate", schema.SHARED_EXPERT_GATES)
  family.validate(e)
  for name in schema.DISPATCHER_OPTIONS[family.dispatcher(e)]:
    allowed = {
      "permute_backend": schema.PERMUTE_BACKENDS,
      "dropless_impl": schema.DROPLESS_IMPLS,
      "expert_exchange": schema.EXCHANGES,
    }.get(name)
    if allowed:
      _one_of(cfg, f"moe.{name}", allowed)
    else:
      _positive(cfg, f"moe.{name}")
  if cfg.task == "lm" and has_moe and not family.is_causal(e):
    field = "moe.priority" if "priority" in {o.name for o in family.options} else "moe.router"
    _check(
      e.allow_noncausal,
      field,
      f"router {e.router!r} with priority {e.priority!r} lets a decoder token see later tokens (see the "
      f"family's is_causal in moejax/routers/); set moe.allow_noncausal=True to train it anyway",
    )


def _train(cfg) -> None:
  t, e = cfg.train, cfg.moe
  _positive(
    cfg, "train.batch_size", "train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints"
  )
  _positive(cfg, "train.eval_every", "train.data_offset", "train.profile_start", allow_zero=True)
  _positive(cfg, "train.profile_steps", "train.microbatches")
  _one_of(cfg, "train.param_dtype", schema.DTYPES)
  _check(
    t.batch_size % t.microbatches == 0,
    "train.microbatches",
    f"{t.microbatches} must divide train.batch_size = {t.batch_size}",
  )
  last = t.profile_start + t.profile_steps - 1
  _check(
    not t.profile_start or last <= t.num_steps,
    "train.profile_start",
    f"profiles steps {t.profile_start}..{last}, past train.num_steps = {t.num_steps}",
  )
  if cfg.task == "lm":  # Tokens per image are known once the data is: checked in models.build.vit_config.
    _check(t.seq_len >= 2, "train.seq_len", f"must be >= 2, got {t.seq_len}")
    group = e.group_size or t.seq_len
    _check(
      group % t.seq_len == 0 or t.seq_len % group == 0,
      "moe.group_size",
      f"must divide train.seq_len ({t.seq_len}) or be a multiple of it, got {e.group_size}",
    )


def _init(cfg) -> None:
  i = cfg.init
  _check(isinstance(i.checkpoint, str), "init.checkpoint", f"must be a path or '', got {i.checkpoint!r}")
  _positive(cfg, "init.step", "init.upcycle_noise", allow_zero=True)
  _positive(cfg, "init.upcycle_segments")
  if i.upcycle:
    _check(schema.has_moe_layers(cfg), "init.upcycle", "the model has no MoE layer to upcycle into")
  for field in ("init.include", "init.exclude"):
    _regexes(cfg, field)


def _lora(cfg) -> None:
  lo = cfg.lora
  _check(isinstance(lo.rank, int) and lo.rank >= 0, "lora.rank", f"must be an integer >= 0, got {lo.rank!r}")
  if lo.rank == 0:
    return
  _positive(cfg, "lora.alpha")
  for field, allowed in (("lora.targets", schema.LORA_GROUPS), ("lora.train", schema.FREEZE_GROUPS)):
    for group in _get(cfg, field):
      _check(group in allowed, field, f"{group!r} is not a group; choose from {allowed}")
  _regexes(cfg, "lora.patterns")
  _regexes(cfg, "lora.train_patterns")
  _check(lo.targets or lo.patterns, "lora.targets", "no group and no lora.patterns: nothing to adapt")
  for field in ("optim.freeze", "optim.freeze_patterns"):
    _check(
      not _get(cfg, field),
      field,
      "with lora.rank > 0 the base model is frozen; name the groups that still train in lora.train",
    )


def _regexes(cfg, field: str) -> None:
  """The field holds a tuple of regular expressions."""
  patterns = _get(cfg, field)
  _check(
    isinstance(patterns, (tuple, list)) and all(isinstance(p, str) for p in patterns),
    field,
    f"must be a tuple of regular expressions, got {patterns!r}",
  )
  for pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(field, f"{pattern!r} is not a regular expression ({e})") from None


def _optim(cfg) -> None:
  o = cfg.optim
  _check(o.learning_rate > 0, "optim.learning_rate", f"must be > 0, got {o.learning_rate}")
  _positive(cfg, "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip_norm", "optim.eps", allow_zero=True)
  _one_of(cfg, "optim.schedule", ("cosine", "constant"))
  for field in ("optim.b1", "optim.b2"):
    _check(0 <= _get(cfg, field) < 1, field, f"must be in [0, 1), got {_get(cfg, field)}")
  _check(0 <= o.end_lr_fraction <= 1, "optim.end_lr_fraction", f"must be in [0, 1], got {o.end_lr_fraction}")
  for group in o.freeze:
    _check(
      group in schema.FREEZE_GROUPS, "optim.freeze", f"{group!r} is not a group; choose from {schema.FREEZE_GROUPS}"
    )
  _regexes(cfg, "optim.freeze_patterns")
  _check(
    not ("experts" in o.freeze and "non_experts" in o.freeze),
    "optim.freeze",
    "'experts' and 'non_experts' freeze everything",
  )


def _data(cfg) -> None:
  d = cfg.data
  if cfg.task == "vit":
    _one_of(cfg, "data.source", ("digits", "tfds"))
    if d.source == "digits":
      _check(
        0 < d.digits.eval_fraction < 1, "data.digits.eval_fraction", f"must be in (0, 1), got {d.digits.eval_fraction}"
      )
    return
  _one_of(cfg, "data.source", SOURCES)
  _positive(cfg, "data.num_eval_batches")
  if d.source == "markov_mixture":
    _positive(
      cfg,
      "data.markov.vocab_size",
      "data.markov.num_sources",
      "data.markov.branching",
      "data.markov.num_train",
      "data.markov.num_validation",
    )
    _check(
      d.markov.branching <= d.markov.vocab_size,
      "data.markov.branching",
      f"must be <= data.markov.vocab_size ({d.markov.vocab_size}), got {d.markov.branching}",
    )
    for split in ("num_train", "num_validation"):
      _check(
        d.markov[split] >= cfg.train.batch_size,
        f"data.markov.{split}",
        f"must hold at least one batch (train.batch_size = {cfg.train.batch_size}), got {d.markov[split]}",
      )
  elif d.source == "text_bytes":
    _positive(cfg, "data.text.max_bytes")
  else:
    _check(bool(d.tfds.name), "data.tfds.name", "must name a prepared TFDS dataset (e.g. 'lm1b')")
    _positive(cfg, "data.tfds.max_bytes", allow_zero=True)


def _mesh(cfg, num_devices: int, num_processes: int) -> None:
  e, t = cfg.moe, cfg.train
  data_devices, expert_devices, model_devices = mesh_shape(cfg, num_devices)
  dropless = routers.get(e.router).dispatcher(e) == "dropless"
  if dropless and e.expert_exchange == "ragged" and expert_devices > 1:  # With one, no exchange runs.
    import jax  # Local: only this check asks for the backend.

    _check(
      jax.default_backend() != "cpu",
      "moe.expert_exchange",
      "'ragged' needs a GPU or TPU (XLA:CPU has no ragged_all_to_all); use 'auto' or 'padded'",
    )
  mesh_devices = data_devices * expert_devices  # The batch is split over these; a 'model' row shares its rows.
  _check(
    num_processes == 1 or mesh_devices * model_devices == num_devices,
    "mesh.data" if cfg.mesh.data != -1 else "mesh.expert",
    f"with {num_processes} processes the mesh must use all {num_devices} devices (each process feeds its "
    f"own); got data={data_devices} × expert={expert_devices} × model={model_devices}",
  )
  _check(
    num_processes == 1 or (num_devices // num_processes) % model_devices == 0,
    "mesh.model",
    f"{model_devices} must divide each process's {num_devices // num_processes} devices: the devices of a "
    "'model' row share their batch rows, which one process feeds",
  )
  d_expert = e.d_expert or cfg.model.d_ff
  _check(
    not schema.has_moe_layers(cfg)
    or model_devices == 1
    or not cfg.mesh.rules.expert_mlp
    or d_expert % model_devices == 0,
    "mesh.model",
    f"{model_devices} model devices must divide the experts' hidden dimension {d_expert} (moe.d_expert, or "
    "model.d_ff when 0) when mesh.rules.expert_mlp is 'model'; or set mesh.rules.expert_mlp=''",
  )
  has_moe = schema.has_moe_layers(cfg)
  _check(
    not has_moe or e.num_experts % expert_devices == 0,
    "mesh.expert",
    f"{expert_devices} expert devices must divide moe.num_experts={e.num_experts}",
  )
  micro = t.batch_size // t.microbatches  # Each micro-batch runs as a batch of its own.
  _check(
    micro % mesh_devices == 0,
    "train.batch_size",
    f"{t.batch_size}"
    + (f" / train.microbatches = {micro}" if t.microbatches > 1 else "")
    + f" must be divisible by the mesh's {mesh_devices} devices (data={data_devices} × expert={expert_devices})",
  )
  if cfg.task == "lm":
    group = e.group_size or t.seq_len
    num_groups = micro * t.seq_len // group
    _check(
      num_groups % mesh_devices == 0 and (micro * t.seq_len) % group == 0,
      "moe.group_size",
      f"the {'micro-' if t.microbatches > 1 else ''}batch's {micro * t.seq_len} tokens must split into groups "
      f"of {group} whose count is divisible by the mesh's {mesh_devices} data × expert devices",
    )


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """(data, expert, model) devices of the mesh for `num_devices` devices; raises ConfigError if it can't be built."""
  m = cfg.mesh
  _check(m.expert >= 1, "mesh.expert", f"must be >= 1, got {m.expert}")
  _check(m.model >= 1, "mesh.model", f"must be >= 1, got {m.model}")
  _check(m.data == -1 or m.data >= 1, "mesh.data", f"must be -1 (all devices) or >= 1, got {m.data}")
  rest = m.expert * m.model
  _check(
    rest <= num_devices and num_devices % rest == 0 or m.data != -1,
    "mesh.expert" if m.model == 1 else "mesh.model",
    f"expert={m.expert} × model={m.model} must divide the {num_devices} devices when mesh.data is -1",
  )
  data = num_devices // rest if m.data == -1 else m.data
  _check(
    data * rest <= num_devices,
    "mesh.data" if m.data != -1 else "mesh.expert",
    f"data={data} × expert={m.expert} × model={m.model} asks for {data * rest} devices but only {num_devices} exist",
  )
  for name, axis in m.rules.items():
    _check(axis in ("model", ""), f"mesh.rules.{name}", f"{axis!r} is not allowed; choose 'model' or '' (replicated)")
  return data, m.expert, m.model


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(field, message)


def _get(cfg, field: str):
  node = cfg
  for part in field.split("."):
    node = node[part]
  return node


def _one_of(cfg, field: str, allowed) -> None:
  value = _get(cfg, field)
  _check(value in allowed, field, f"{value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _positive(cfg, *fields, allow_zero: bool = False) -> None:
  for field in fields:
    value = _get(cfg, field)
    ok = value >= 0 if allow_zero else value > 0
    _check(ok, field, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_keys(cfg, reference, prefix: str = "") -> None:
  """Every field of cfg must exist in the schema (catches hand-built ConfigDicts too)."""
  for key in cfg.keys():
    name = prefix + key
    _check(key in reference, name, f"unknown config field; allowed here: {', '.join(sorted(reference.keys()))}")
    if isinstance(reference[key], ml_collections.ConfigDict):
      _check(isinstance(cfg[key], (ml_collections.ConfigDict, dict)), name, "must be a group of fields")
      _check_keys(cfg[key], reference[key], name + ".")
  for key in reference.keys():
    _check(key in cfg, prefix + key, "missing config field (start config files from moejax.config.base_config())")
