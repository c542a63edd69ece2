"""The configuration schema: every field, its default, and start-up validation.

Experiment files in `configs/` start from `base_config()` and override fields. The returned
ConfigDict is locked, so a misspelled field in a config file or a `--config.x.y=v` override is
refused instead of silently ignored. `validate` checks values once, at start-up, and raises a
`ConfigError` naming the field and what is allowed; `moejax.main` turns that into one line on
stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections

from moejax import dispatch, distributed, dropless, kernels, losses, routers, routing
from moejax.data.config import SOURCES, default_data_config
from moejax.layers import ffn, moe
from moejax.models import decoder


class ConfigError(ValueError):
  """A config value that is not allowed; str() is one line naming the field."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


def base_config(task: str = "lm") -> ml_collections.ConfigDict:
  """All fields with their defaults.

  task 'lm': a small MoE decoder on the synthetic Markov mixture; task 'vit': a small MoE ViT
  on scikit-learn's embedded digits. The two share the moe, optim, train and mesh groups.
  """
  if task not in ("lm", "vit"):
    raise ConfigError("task", f"{task!r} is not allowed; choose one of 'lm', 'vit'")
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  if task == "lm":
    c.model.vocab_size = 0  # 0: the dataset's vocabulary size.
  else:
    c.model.patch_size = 2  # Patches of p×p pixels (8×8 digits: 16 patches).
    c.model.pooling = "gap"  # 'gap' (mean of the final tokens) | 'cls' (class token)
    c.model.moe_last = 0  # MoE in the last N blocks instead of every P-th (Soft MoE paper).
  c.model.num_layers = 4
  c.model.d_model = 128
  c.model.num_heads = 4
  if task == "lm":
    c.model.num_kv_heads = 0  # 0: num_heads; fewer: grouped-query attention (Mixtral, Qwen3).
    c.model.head_dim = 0  # 0: d_model / num_heads (Qwen3 sets 128 with d_model 2048, 32 heads).
    c.model.qk_norm = False  # RMSNorm on each query and key head (OLMoE, Qwen3).
  c.model.d_ff = 512  # Hidden size of dense FFNs (and of experts unless moe.d_expert is set).
  if task == "lm":
    c.model.positions = "rope"  # 'rope' | 'learned'
  c.model.activation = "gelu"  # 'gelu' | 'relu' | 'swiglu'
  c.model.moe_every = 2  # MoE FFN in every P-th block; 0 = dense baseline.
  if task == "lm":
    c.model.tie_embeddings = False
  c.model.init_scale = 1.0  # Variance scale of fan-in init (Switch: 0.1).
  c.model.dtype = "float32"  # Activation dtype: 'float32' | 'bfloat16'. Router stays float32.

  c.moe = ml_collections.ConfigDict()
  # 'top_k' | 'expert_choice' | 'soft_moe' | 'hash' | 'dense' | 'deepseek' (see moejax/routers.py).
  c.moe.router = "top_k"
  c.moe.num_experts = 8
  c.moe.top_k = 2  # 1 = Switch, 2 = GShard; also DeepSeek's K.
  c.moe.d_expert = 0  # 0: model.d_ff. Fine-grained experts: many experts, small d_expert, larger K.
  c.moe.num_shared_experts = 0  # Always-on experts of hidden size d_expert (DeepSeekMoE).
  c.moe.capacity_factor = 1.25  # Training; top-k capacity = ceil(S·K·cf / E), expert choice ceil(S·cf / E).
  c.moe.eval_capacity_factor = 2.0
  c.moe.group_size = 0  # Tokens per routing group; 0 = one sequence per group.
  c.moe.combine_weights = "raw"  # 'raw' (Switch/vmoe) | 'renormalized' (GShard/Mixtral/DeepSeek-V3)
  c.moe.priority = "token_major"  # 'token_major' (causal) | 'choice_major' (vmoe) | 'bpr' (V-MoE)
  c.moe.allow_noncausal = False  # Allow a router setting that lets a decoder see the future.
  c.moe.dispatcher = "sort"  # 'sort' (row gathers) | 'einsum' (GShard one-hot) | 'dropless'
  # Token permutation of 'sort' and 'dropless': 'auto' (XLA until the Pallas kernels are measured
  # on hardware) | 'xla' | 'pallas' (Triton on GPU, Mosaic on TPU, interpreted on CPU: slow).
  c.moe.permute_backend = "auto"
  c.moe.dropless_impl = "auto"  # 'auto' | 'blocks' (B-row block loop) | 'ragged_dot' (grouped matmul)
  c.moe.dropless_block_size = 64  # Rows per block of dropless_impl='blocks'.
  # Dropless with mesh.expert > 1: 'auto' (ragged on GPU/TPU, padded on CPU) | 'padded' (all_to_all
  # of N rows per device pair, runs anywhere) | 'ragged' (jax.lax.ragged_all_to_all; GPU/TPU only).
  c.moe.expert_exchange = "auto"
  c.moe.router_noise = "none"  # Training only: 'none' | 'noisy_top_k' (Shazeer) | 'jitter' (Switch)
  c.moe.jitter_eps = 0.01  # Router input × Uniform(1 − ε, 1 + ε) with router_noise='jitter'.
  c.moe.second_expert_policy = "all"  # 'all' | 'random' (GShard: 2nd expert only if 2·g2 > u)
  c.moe.max_experts_per_token = 0  # Expert choice: cap on experts per token; 0 = none.
  c.moe.slots_per_expert = 1  # Soft MoE slots p per expert.
  c.moe.soft_normalize = True  # Soft MoE: L2-normalize tokens and slot parameters, learned scale.
  c.moe.hash_seed = 0
  c.moe.score_function = "softmax"  # DeepSeek: 'softmax' (V2) | 'sigmoid' (V3)
  c.moe.bias_update_rate = 1e-3  # DeepSeek-V3 aux-loss-free balancing γ; 0 = off.
  c.moe.num_expert_groups = 1  # DeepSeek group-limited routing: experts in groups ...
  c.moe.top_expert_groups = 1  # ... of which each token may use the best ones.
  c.moe.load_balance_density = "top1"  # 'top1' (Switch) | 'topk' (any of the K choices)
  c.moe.load_balance_scope = "group"  # 'group' | 'local_batch' (per device) | 'global_batch' (Qwen)
  c.moe.load_balance_loss_weight = 1e-2  # α, summed over MoE layers.
  c.moe.z_loss_weight = 1e-3  # ST-MoE router z-loss coefficient, summed over MoE layers.
  c.moe.importance_loss_weight = 0.0  # Shazeer's CV²(importance).
  c.moe.load_loss_weight = 0.0  # Shazeer's CV²(smooth load); needs router_noise='noisy_top_k'.
  c.moe.dead_expert_steps = 100  # An expert with no tokens for this many steps counts as dead.

  if task == "lm":
    c.data = default_data_config()
  else:
    from moejax.data.images import default_image_data_config  # numpy + ml_collections only.
    c.data = default_image_data_config()

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-3  # Peak, after linear warm-up.
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"  # 'cosine' (decay to end_lr_fraction·peak at the last step) | 'constant'
  c.optim.end_lr_fraction = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.grad_clip_norm = 1.0  # Global-norm clipping; 0 = off.

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # Global, in sequences or images.
  if task == "lm":
    c.train.seq_len = 128
  c.train.num_steps = 1000
  c.train.log_every = 50
  c.train.eval_every = 250  # 0: evaluate only at the end.
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 3

  # Devices: a ('data', 'expert') mesh. Batches (and MoE groups) are split over all of its
  # devices; expert weights over 'expert' (E/expert experts per device), other weights replicated
  # or, with fsdp, split over 'data' too. See README "Scaling out".
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Devices on the data axis; -1: all devices / mesh.expert.
  c.mesh.expert = 1  # Devices on the expert axis (expert parallelism); must divide moe.num_experts.
  c.mesh.fsdp = False  # Also split non-expert weights and optimizer state over 'data' (ZeRO-3 style).

  # Multi-host (one process per host or per GPU): `jax.distributed.initialize` before JAX starts.
  c.distributed = ml_collections.ConfigDict()
  # 'auto': initialize when a coordinator address is given (here or $JAX_COORDINATOR_ADDRESS) or a
  # multi-process cluster is detected (Cloud TPU pod slice, SLURM, Open MPI); 'yes' | 'no'.
  c.distributed.initialize = "auto"
  c.distributed.coordinator_address = ""  # host:port of process 0; '': from the cluster / environment.
  c.distributed.num_processes = 0  # 0: from the cluster / environment.
  c.distributed.process_id = -1  # -1: from the cluster / environment.

  c.lock()
  return c


# Fields that may change when a run is resumed in the same workdir (they change neither what the
# checkpoint holds nor the training that follows it); any other difference from the workdir's
# config.json is refused. train.num_steps may change only under a constant learning rate: the
# cosine schedule decays over num_steps, so a new horizon would jump the learning rate.
RESUMABLE_CHANGES = ("train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "data.data_dir", "mesh.data", "mesh.expert", "mesh.fsdp", "distributed.initialize",
                     "distributed.coordinator_address", "distributed.num_processes", "distributed.process_id")


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'group.field': value} of a nested dict (a config's to_dict())."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def differences_from_saved(workdir: str, resolved: dict) -> tuple[list[str], tuple[str, ...]]:
  """(['field=saved->new', ...], the fields allowed to differ) against <workdir>/config.json.

  Empty when the workdir holds no config.json or one that only differs in fields a resumed run
  may change (RESUMABLE_CHANGES, and train.num_steps under a constant schedule). A field the saved
  config lacks (added to moejax after the run) counts only if it is set to other than its default.
  """
  saved_path = os.path.join(workdir, "config.json")
  new = flatten(json.loads(json.dumps(resolved)))
  resumable = RESUMABLE_CHANGES + (("train.num_steps",) if new.get("optim.schedule") == "constant" else ())
  if not os.path.exists(saved_path):
    return [], resumable
  with open(saved_path) as f:
    saved = flatten(json.load(f))
  defaults = flatten(json.loads(json.dumps(base_config(new.get("task", "lm")).to_dict())))
  added_as_default = {k for k in set(new) - set(saved) if k in defaults and new[k] == defaults[k]}
  differ = sorted(k for k in set(saved) | set(new)
                  if saved.get(k) != new.get(k) and k not in resumable and k not in added_as_default)
  return [f"{k}={saved.get(k)!r}->{new.get(k)!r}" for k in differ], resumable


def override(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """Sets {'group.field': value} on `config` (as --config.group.field=value would); returns it."""
  for key, value in values.items():
    node = config
    *groups, name = key.split(".")
    for group in groups:
      node = node[group]
    node[name] = value
  return config


def _check(ok: bool, field: str, message: str):
  if not ok:
    raise ConfigError(field, message)


def _one_of(cfg, field: str, allowed):
  value = _get(cfg, field)
  _check(value in allowed, field, f"{value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _get(cfg, field: str):
  node = cfg
  for part in field.split("."):
    node = node[part]
  return node


def _check_keys(cfg, reference, prefix: str = ""):
  """Every field of cfg must exist in the schema (catches hand-built ConfigDicts too)."""
  for key in cfg.keys():
    name = prefix + key
    _check(key in reference, name, f"unknown config field; allowed here: {', '.join(sorted(reference.keys()))}")
    if isinstance(reference[key], ml_collections.ConfigDict):
      _check(isinstance(cfg[key], (ml_collections.ConfigDict, dict)), name, "must be a group of fields")
      _check_keys(cfg[key], reference[key], name + ".")
  for key in reference.keys():
    _check(key in cfg, prefix + key, "missing config field (start config files from moejax.config.base_config())")


def _positive(cfg, *fields, allow_zero: bool = False):
  for field in fields:
    value = _get(cfg, field)
    ok = value >= 0 if allow_zero else value > 0
    _check(ok, field, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
  """Raises ConfigError for the first inconsistent or malformed field (num_devices over all processes)."""
  _check("task" in cfg and cfg.task in ("lm", "vit"), "task", "must be 'lm' or 'vit' (start config files "
         "from moejax.config.base_config(task))")
  _check_keys(cfg, base_config(cfg.task))
  m, e, t, o = cfg.model, cfg.moe, cfg.train, cfg.optim
  lm = cfg.task == "lm"
  _positive(cfg, "model.num_layers", "model.d_model", "model.num_heads", "model.d_ff", "model.init_scale")
  _positive(cfg, "model.moe_every", allow_zero=True)
  _check(m.moe_every <= m.num_layers, "model.moe_every",
         f"must be <= model.num_layers ({m.num_layers}) or 0 for a dense model, got {m.moe_every}")
  if lm:
    _positive(cfg, "model.vocab_size", allow_zero=True)
  else:
    _positive(cfg, "model.patch_size")
    _positive(cfg, "model.moe_last", allow_zero=True)
    _check(m.moe_last <= m.num_layers, "model.moe_last", f"must be <= model.num_layers ({m.num_layers})")
    _check(not (m.moe_last and m.moe_every), "model.moe_last", "set model.moe_every or model.moe_last, not both")
    _one_of(cfg, "model.pooling", ("gap", "cls"))
  if lm:
    _positive(cfg, "model.num_kv_heads", "model.head_dim", allow_zero=True)
    _check(m.num_kv_heads == 0 or m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"must divide num_heads ({m.num_heads}), or be 0 (= num_heads); got {m.num_kv_heads}")
  head_dim = m.head_dim if lm and m.head_dim else None
  _check(head_dim or m.d_model % m.num_heads == 0, "model.num_heads",
         f"d_model ({m.d_model}) must be divisible by num_heads ({m.num_heads}) unless model.head_dim is set")
  if lm:
    head_dim = head_dim or m.d_model // m.num_heads
    _check(m.positions != "rope" or head_dim % 2 == 0, "model.positions",
           f"'rope' needs an even head dim, got {head_dim}")
    _one_of(cfg, "model.positions", decoder.POSITIONS)
  _one_of(cfg, "model.activation", ffn.ACTIVATIONS)
  _one_of(cfg, "model.dtype", decoder.DTYPES)

  _one_of(cfg, "moe.router", routers.ROUTERS)
  _check(e.num_experts >= 1, "moe.num_experts", f"must be >= 1, got {e.num_experts}")
  if e.router in ("top_k", "deepseek"):
    _check(1 <= e.top_k <= e.num_experts, "moe.top_k",
           f"must be between 1 and moe.num_experts ({e.num_experts}), got {e.top_k}")
  _check(e.router != "hash" or e.top_k == 1, "moe.top_k", f"the hash router sends each token to 1 expert; "
         f"set moe.top_k=1 (got {e.top_k})")
  _check(e.router != "hash" or e.priority != "bpr", "moe.priority",
         "'bpr' orders tokens by router probability, which the hash router does not have")
  _check(e.max_experts_per_token == 0 or e.router == "expert_choice", "moe.max_experts_per_token",
         f"applies to router 'expert_choice' only, not {e.router!r}")
  _check((e.num_expert_groups, e.top_expert_groups) == (1, 1) or e.router == "deepseek", "moe.num_expert_groups",
         f"group-limited routing applies to router 'deepseek' only, not {e.router!r}")
  _check(e.importance_loss_weight == 0 or e.router not in ("soft_moe", "hash"), "moe.importance_loss_weight",
         f"router {e.router!r} has no router probabilities to balance")
  _check(e.router_noise != "noisy_top_k" or e.top_k < e.num_experts, "moe.router_noise",
         f"noisy top-k needs moe.top_k < moe.num_experts (an expert must be able to miss); got "
         f"top_k={e.top_k}, num_experts={e.num_experts}")
  _positive(cfg, "moe.capacity_factor", "moe.eval_capacity_factor", "moe.slots_per_expert",
            "moe.dead_expert_steps", "moe.dropless_block_size")
  _positive(cfg, "moe.d_expert", "moe.group_size", "moe.load_balance_loss_weight", "moe.z_loss_weight",
            "moe.importance_loss_weight", "moe.load_loss_weight", "moe.num_shared_experts",
            "moe.max_experts_per_token", "moe.bias_update_rate", "moe.jitter_eps", allow_zero=True)
  for field, allowed in (("moe.combine_weights", routing.COMBINE_WEIGHTS), ("moe.priority", routing.PRIORITIES),
                         ("moe.dispatcher", dispatch.DISPATCHERS), ("moe.router_noise", routers.ROUTER_NOISE),
                         ("moe.permute_backend", kernels.BACKENDS), ("moe.dropless_impl", dropless.IMPLS),
                         ("moe.expert_exchange", moe.EXCHANGES),
                         ("moe.second_expert_policy", ("all", "random")),
                         ("moe.score_function", routers.SCORE_FUNCTIONS),
                         ("moe.load_balance_density", losses.LOAD_BALANCE_DENSITIES),
                         ("moe.load_balance_scope", losses.LOAD_BALANCE_SCOPES)):
    _one_of(cfg, field, allowed)
  _check(e.max_experts_per_token <= e.num_experts, "moe.max_experts_per_token",
         f"must be <= moe.num_experts ({e.num_experts}), got {e.max_experts_per_token}")
  _check(e.second_expert_policy == "all" or (e.router == "top_k" and e.top_k == 2), "moe.second_expert_policy",
         "'random' is GShard's policy for router 'top_k' with top_k = 2")
  _check(e.router_noise == "none" or e.router == "top_k", "moe.router_noise",
         f"noise applies to router 'top_k' only, not {e.router!r}")
  _check(e.load_loss_weight == 0 or e.router_noise == "noisy_top_k", "moe.load_loss_weight",
         "Shazeer's load loss needs moe.router_noise='noisy_top_k'")
  _check(e.dispatcher != "dropless" or e.router not in ("expert_choice", "soft_moe"), "moe.dispatcher",
         f"'dropless' is for token-choice routers; {e.router!r} fixes its slots by construction")
  if e.router == "deepseek":
    _check(e.num_expert_groups >= 1 and e.num_experts % e.num_expert_groups == 0, "moe.num_expert_groups",
           f"must divide moe.num_experts ({e.num_experts}), got {e.num_expert_groups}")
    _check(1 <= e.top_expert_groups <= e.num_expert_groups, "moe.top_expert_groups",
           f"must be between 1 and moe.num_expert_groups ({e.num_expert_groups}), got {e.top_expert_groups}")
    _check(e.top_k <= e.top_expert_groups * (e.num_experts // e.num_expert_groups), "moe.top_k",
           "exceeds the experts in the moe.top_expert_groups groups a token may use")
  if lm and m.moe_every > 0 and not routers.is_causal(e.router, e.top_k, e.priority, e.dispatcher):
    field = "moe.router" if e.router in ("expert_choice", "soft_moe") else "moe.priority"
    _check(e.allow_noncausal, field,
           f"router {e.router!r} with priority {e.priority!r} lets a decoder token see later tokens "
           "(see moejax/routers.py is_causal); set moe.allow_noncausal=True to train it anyway")

  _positive(cfg, "train.batch_size", "train.num_steps", "train.log_every", "train.checkpoint_every",
            "train.keep_checkpoints")
  _positive(cfg, "train.eval_every", allow_zero=True)
  if lm:
    _check(t.seq_len >= 2, "train.seq_len", f"must be >= 2, got {t.seq_len}")
    seq_len = t.seq_len
  else:
    seq_len = None  # Tokens per image are known once the data is: checked in vit_config.
  group = e.group_size or seq_len
  if seq_len:
    _check(group % seq_len == 0 or seq_len % group == 0, "moe.group_size",
           f"must divide train.seq_len ({seq_len}) or be a multiple of it, got {e.group_size}")

  _check(o.learning_rate > 0, "optim.learning_rate", f"must be > 0, got {o.learning_rate}")
  _positive(cfg, "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip_norm", "optim.eps",
            allow_zero=True)
  _one_of(cfg, "optim.schedule", ("cosine", "constant"))
  for field in ("optim.b1", "optim.b2", "optim.end_lr_fraction"):
    value = _get(cfg, field)
    _check(0 <= value <= 1 if field.endswith("fraction") else 0 <= value < 1, field,
           f"must be in [0, 1{']' if field.endswith('fraction') else ')'}, got {value}")

  if lm:
    _validate_data(cfg)
  else:
    _one_of(cfg, "data.source", ("digits", "tfds"))
    _check(0 < cfg.data.digits.eval_fraction < 1, "data.digits.eval_fraction",
           f"must be in (0, 1), got {cfg.data.digits.eval_fraction}")

  distributed.check(cfg)
  data_devices, expert_devices = mesh_shape(cfg, num_devices)
  # The exchange runs only between several expert devices; with one, 'ragged' is simply unused.
  _check(not (e.expert_exchange == "ragged" and expert_devices > 1 and jax.default_backend() == "cpu"),
         "moe.expert_exchange", "'ragged' needs a GPU or TPU (XLA:CPU has no ragged_all_to_all); "
         "use 'auto' or 'padded'")
  mesh_devices = data_devices * expert_devices
  _check(num_processes == 1 or mesh_devices == num_devices, "mesh.data" if cfg.mesh.data != -1 else "mesh.expert",
         f"with {num_processes} processes the mesh must use all {num_devices} devices (each process feeds its "
         f"own); got data={data_devices} × expert={expert_devices}")
  _check(e.num_experts % expert_devices == 0, "mesh.expert",
         f"{expert_devices} expert devices must divide moe.num_experts={e.num_experts}")
  _check(t.batch_size % mesh_devices == 0, "train.batch_size",
         f"{t.batch_size} must be divisible by the mesh's {mesh_devices} devices "
         f"(data={data_devices} × expert={expert_devices})")
  if seq_len:
    num_groups = t.batch_size * seq_len // group
    _check(num_groups % mesh_devices == 0 and (t.batch_size * seq_len) % group == 0, "moe.group_size",
           f"the batch's {t.batch_size * seq_len} tokens must split into groups of {group} "
           f"whose count is divisible by the mesh's {mesh_devices} devices")


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, expert) devices of the mesh for `num_devices` devices; raises ConfigError if it can't be built."""
  m = cfg.mesh
  _check(m.expert >= 1, "mesh.expert", f"must be >= 1, got {m.expert}")
  _check(m.data == -1 or m.data >= 1, "mesh.data", f"must be -1 (all devices) or >= 1, got {m.data}")
  _check(m.expert <= num_devices and num_devices % m.expert == 0 or m.data != -1, "mesh.expert",
         f"{m.expert} must divide the {num_devices} devices when mesh.data is -1")
  data = num_devices // m.expert if m.data == -1 else m.data
  _check(data * m.expert <= num_devices, "mesh.data" if m.data != -1 else "mesh.expert",
         f"data={data} × expert={m.expert} asks for {data * m.expert} devices but only {num_devices} exist")
  return data, m.expert


def _validate_data(cfg: ml_collections.ConfigDict) -> None:
  d = cfg.data
  _one_of(cfg, "data.source", SOURCES)
  _positive(cfg, "data.num_eval_batches")
  if d.source == "markov_mixture":
    _positive(cfg, "data.markov.vocab_size", "data.markov.num_sources", "data.markov.branching",
              "data.markov.num_train", "data.markov.num_validation")
    _check(d.markov.branching <= d.markov.vocab_size, "data.markov.branching",
           f"must be <= data.markov.vocab_size ({d.markov.vocab_size}), got {d.markov.branching}")
    _check(d.markov.num_train >= cfg.train.batch_size, "data.markov.num_train",
           f"must hold at least one batch (train.batch_size = {cfg.train.batch_size}), got {d.markov.num_train}")
    _check(d.markov.num_validation >= cfg.train.batch_size, "data.markov.num_validation",
           f"must hold at least one batch (train.batch_size = {cfg.train.batch_size}), got {d.markov.num_validation}")
  elif d.source == "text_bytes":
    _positive(cfg, "data.text.max_bytes")
  else:
    _check(bool(d.tfds.name), "data.tfds.name", "must name a prepared TFDS dataset (e.g. 'lm1b')")
    _positive(cfg, "data.tfds.max_bytes", allow_zero=True)


def moe_config(cfg: ml_collections.ConfigDict) -> moe.MoEConfig:
  """The MoE layers' static config."""
  m, e = cfg.model, cfg.moe
  moe_fields = {f.name for f in dataclasses.fields(moe.MoEConfig)}
  derived = dict(d_expert=e.d_expert or m.d_ff, activation=m.activation, init_scale=m.init_scale)
  return moe.MoEConfig(**{k: v for k, v in e.items() if k in moe_fields and k not in derived}, **derived)


def vit_config(cfg: ml_collections.ConfigDict, image_shape, num_classes: int, num_mesh_devices: int = 1):
  """The ViT's static config for images of `image_shape` [H, W, C]; raises ConfigError if they don't fit."""
  from moejax.models.vit import ViTConfig
  m, e = cfg.model, cfg.moe
  height, width, channels = image_shape
  _check(height == width and height % m.patch_size == 0, "model.patch_size",
         f"must divide the {height}×{width} images, got {m.patch_size}")
  vit = ViTConfig(image_size=height, channels=channels, num_classes=num_classes, patch_size=m.patch_size,
                  num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads, d_ff=m.d_ff,
                  activation=m.activation, moe_every=m.moe_every, moe_last=m.moe_last, pooling=m.pooling,
                  init_scale=m.init_scale, dtype=m.dtype, moe=moe_config(cfg))
  group = e.group_size or vit.num_tokens
  _check(vit.num_tokens % group == 0 or group % vit.num_tokens == 0, "moe.group_size",
         f"must divide the {vit.num_tokens} tokens per image or be a multiple of it, got {e.group_size}")
  tokens = cfg.train.batch_size * vit.num_tokens
  _check(tokens % group == 0 and (tokens // group) % num_mesh_devices == 0, "moe.group_size",
         f"the batch's {tokens} tokens must split into groups of {group} whose count is divisible by "
         f"the mesh's {num_mesh_devices} devices")
  return vit


def decoder_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> decoder.DecoderConfig:
  """The model's static config; vocab_size is used when model.vocab_size is 0."""
  m = cfg.model
  moe_cfg = moe_config(cfg)
  return decoder.DecoderConfig(
      vocab_size=m.vocab_size or vocab_size, num_layers=m.num_layers, d_model=m.d_model,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, qk_norm=m.qk_norm,
      d_ff=m.d_ff, max_len=cfg.train.seq_len, positions=m.positions,
      activation=m.activation, moe_every=m.moe_every, tie_embeddings=m.tie_embeddings,
      init_scale=m.init_scale, dtype=m.dtype, moe=moe_cfg)
