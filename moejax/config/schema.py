"""The config schema: every field and its default, in one place. Imports neither JAX nor Flax.

Config files in `configs/` start from `base_config()` (usually through `configs/common.py`) and
override fields. The returned ConfigDict is locked, so a misspelled field is refused, never
silently ignored. The `moe` section holds the fields every router family reads, the dispatchers'
options, and every registered family's own options (`moejax.routers`, each family declares its
own with their defaults); the layer and model dataclasses (`MoEConfig`, `DecoderConfig`,
`ViTConfig`) take their defaults from here (`defaults`).

Which fields are active depends on other fields (`active_fields`, checked by `moejax.config.validate`):
the options of the selected router family and dispatcher, the data source's subsection, the
cosine schedule's end value. A field of an inactive part set away from its default is refused.
"""

from __future__ import annotations

import functools

import ml_collections

from moejax import routers
from moejax.data.config import default_data_config
from moejax.errors import ConfigError

TASKS = ("lm", "vit")
POSITIONS = ("rope", "learned")
REMAT_POLICIES = ("none", "full", "dots", "moe")  # moejax.models.remat.POLICIES
DTYPES = ("float32", "bfloat16")
ACTIVATIONS = ("gelu", "relu", "swiglu", "clamped_swiglu", "geglu")
POOLINGS = ("gap", "cls")
QK_NORM_SCOPES = ("per_head", "projection")
ATTENTION_BIASES = ("none", "qkv", "qkvo")
SHARED_EXPERT_GATES = ("none", "sigmoid")
ROPE_SCALINGS = ("none", "yarn")
NORMS = ("rms", "layer")
FREEZE_GROUPS = ("experts", "router", "non_experts", "attention", "embeddings")
LORA_GROUPS = ("attention", "ffn", "experts", "dense_ffn", "router")
# model.attention selects one kind; each kind reads its own model fields (the other kind's are inactive).
ATTENTION_OPTIONS = {
  "mha": (
    "num_kv_heads",
    "head_dim",
    "qk_norm",
    "qk_norm_scope",
    "attention_bias",
    "sliding_window",
    "full_attention_every",
    "attention_sinks",
    "clip_qkv",
    "attention_softcap",
  ),
  "mla": ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
}
YARN_FIELDS = (
  "yarn_factor",
  "yarn_original_max_len",
  "yarn_beta_fast",
  "yarn_beta_slow",
  "yarn_truncate",
  "yarn_mscale",
  "yarn_mscale_all_dim",
  "yarn_attention_factor",
)

# The dispatchers' own options (moe.dispatcher selects one; moejax.dispatch implements them).
DISPATCHER_OPTIONS = {
  "einsum": (),
  "sort": ("permute_backend",),
  "dropless": ("permute_backend", "dropless_impl", "dropless_block_size", "expert_exchange"),
}
PERMUTE_BACKENDS = ("auto", "pallas", "xla")
DROPLESS_IMPLS = ("auto", "blocks", "ragged_dot", "gather")
EXCHANGES = ("auto", "padded", "ragged")
# data.source -> the data subsection it reads (the other subsections are inactive).
DATA_SUBSECTIONS = {"markov_mixture": "markov", "text_bytes": "text", "tfds": "tfds", "digits": "digits"}


def base_config(task: str = "lm") -> ml_collections.ConfigDict:
  """All fields with their defaults.

  task 'lm': a small MoE decoder on the synthetic Markov mixture; task 'vit': a small MoE ViT
  on scikit-learn's embedded digits. The two share the moe, optim, train and mesh sections.
  """
  if task not in TASKS:
    raise ConfigError("task", f"{task!r} is not allowed; choose one of 'lm', 'vit'")
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  c.model = _model(task)
  c.moe = _moe()
  if task == "lm":
    c.data = default_data_config()
  else:
    from moejax.data.images import default_image_data_config  # numpy + ml_collections only.

    c.data = default_image_data_config()
  c.optim = _optim()
  c.train = _train(task)
  c.init = _init()
  c.lora = _lora()
  c.mesh, c.distributed = _mesh(), _distributed()
  c.lock()
  return c


def _model(task: str) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  if task == "lm":
    m.vocab_size = 0  # 0: the dataset's vocabulary size.
  else:
    m.patch_size = 2  # Patches of p×p pixels (8×8 digits: 16 patches).
    m.pooling = "gap"  # 'gap' (mean of the final tokens) | 'cls' (class token)
    m.moe_last = 0  # MoE in the last N blocks instead of every P-th (Soft MoE paper).
  m.num_layers = 4
  m.d_model = 128
  m.num_heads = 4
  if task == "lm":
    # 'mha': multi-head / grouped-query attention (its fields: ATTENTION_OPTIONS['mha']) | 'mla':
    # DeepSeek-V2/V3's multi-head latent attention (moejax/layers/mla.py; ATTENTION_OPTIONS['mla']).
    m.attention = "mha"
    m.num_kv_heads = 0  # 0: num_heads; fewer: grouped-query attention (Mixtral, Qwen3).
    m.head_dim = 0  # 0: d_model / num_heads (Qwen3 sets 128 with d_model 2048, 32 heads).
    m.qk_norm = False  # RMSNorm on the queries and keys before RoPE (OLMoE, Qwen3).
    # 'per_head': each head normalised, one [H] weight shared by the heads (Qwen3) | 'projection':
    # the whole [N·H] query (and [N_kv·H] key) projection normalised at once, a weight per channel (OLMoE).
    m.qk_norm_scope = "per_head"
    # Biases of the attention projections: 'none' | 'qkv' (Qwen2-MoE) | 'qkvo' (transformers' attention_bias).
    m.attention_bias = "none"
    # Sliding-window attention: > 0, each query sees itself and the sliding_window - 1 keys before
    # it, in every block but every P-th (P = full_attention_every: blocks P-1, 2P-1, ... attend to all;
    # 0: every block slides). gpt-oss: window 128, P = 2 (even blocks slide).
    m.sliding_window = 0
    m.full_attention_every = 0
    m.attention_sinks = False  # A learned logit per head joins each softmax, adding no value (gpt-oss).
    m.clip_qkv = 0.0  # > 0: the q, k, v projections clamped to [-c, c] (DBRX 8); 0: off.
    m.attention_softcap = 0.0  # > 0: attention logits s -> c·tanh(s / c) (Grok-1 30); 0: off.
    m.post_norms = False  # Grok-1's sandwich norms: a norm after the attention and after the FFN too.
    # > 0 (Snowflake Arctic): every MoE block also has a dense SwiGLU FFN of this hidden size on the
    # residual stream, its MoE reading the block's input in parallel (moejax.models.decoder).
    m.parallel_dense_d_ff = 0
    m.embed_multiplier = 1.0  # The embeddings × this (Grok-1: 78.38367176906169).
    m.output_multiplier = 1.0  # The logits × this (Grok-1: 0.5773502691896257).
    # The blocks' and the final norm: 'rms' (RMSNorm) | 'layer' (LayerNorm with a scale, no bias: DBRX).
    m.norm = "rms"
    # Multi-head latent attention (model.attention 'mla'), DeepSeek-V2's names: the query latent's
    # rank (0: queries straight from x, V2-Lite), the key/value latent's rank, per-head dims of the
    # query/key part without and with RoPE, and of the values.
    m.q_lora_rank = 0
    m.kv_lora_rank = 64
    m.qk_nope_head_dim = 32
    m.qk_rope_head_dim = 16
    m.v_head_dim = 32
    m.rope_theta = 10000.0  # RoPE base (transformers' rope_theta): Mixtral, Qwen2/3-MoE 1e6.
    # Pairs (2i, 2i+1) rotate together (the RoPE paper, DeepSeek) instead of (i, i + H/2) (transformers' rotate_half).
    m.rope_interleaved = False
    # 'none' | 'yarn': YaRN context extension (moejax/layers/rope.py; transformers' rope_type 'yarn',
    # its parameters the yarn_* fields; DeepSeek-V2/V3 factor 40, gpt-oss 32).
    m.rope_scaling = "none"
    m.yarn_factor = 1.0  # Context extension factor.
    m.yarn_original_max_len = 4096  # The pre-training context (original_max_position_embeddings).
    m.yarn_beta_fast = 32.0  # Dims turning more often than this over the context keep their frequency ...
    m.yarn_beta_slow = 1.0  # ... those turning fewer times than this are interpolated by 1/factor.
    m.yarn_truncate = True  # Round the ramp's ends to whole dims (gpt-oss: False).
    m.yarn_mscale = 0.0  # DeepSeek's mscale (0: unset): with mscale_all_dim, sets the attention factor.
    m.yarn_mscale_all_dim = 0.0  # DeepSeek: the softmax scale × (0.1·mscale_all_dim·ln(factor) + 1)².
    m.yarn_attention_factor = 0.0  # On the rotated q, k; 0: from factor, mscale, mscale_all_dim.
  m.d_ff = 512  # Hidden size of dense FFNs (and of experts unless moe.d_expert is set).
  if task == "lm":
    m.positions = "rope"  # 'rope' | 'learned'
  m.activation = "gelu"  # 'gelu' | 'relu' | 'swiglu' | 'clamped_swiglu' (gpt-oss) | 'geglu' (Grok-1; layers/ffn.py)
  m.moe_every = 2  # MoE FFN in every P-th block; 0 = dense baseline.
  if task == "lm":
    # Blocks whose FFN stays dense although moe_every would make it MoE (0-based; transformers'
    # mlp_only_layers, DeepSeek's first_k_dense_replace = (0, ..., k-1)).
    m.dense_layers = ()
    m.tie_embeddings = False  # The output projection is the input embedding, transposed.
    # Multi-token prediction (DeepSeek-V3 §2.2): D extra modules, module k predicting token i+1+k
    # at position i from the previous depth's hidden state and the embedding of token i+k; their
    # mean cross-entropy × mtp_loss_weight λ joins the loss (V3: D 1, λ 0.3 then 0.1). Training
    # only: the logits are the main model's.
    m.mtp_depth = 0
    m.mtp_loss_weight = 0.3
  m.norm_eps = 1e-6  # Epsilon of every RMSNorm (transformers' rms_norm_eps): Mixtral, OLMoE 1e-5.
  m.init_scale = 1.0  # Variance scale of fan-in init (Switch: 0.1).
  m.dtype = "float32"  # Activation dtype: 'float32' | 'bfloat16'. Router stays float32.
  # Rematerialisation of each block in training (moejax/models/remat.py): 'none' | 'full' (keep only
  # block inputs) | 'dots' (keep matmul outputs) | 'moe' (keep the expert outputs and all_to_all results).
  m.remat = "none"
  # Run the blocks as a jax.lax.scan over their repeating units (moejax/models/scan.py): the compiled
  # program holds one unit instead of every block. The parameters stay one module per block, so
  # checkpoints are the same either way; the losses and gradients are the unrolled loop's.
  m.scan_layers = False
  return m


def _moe() -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  # The router family: one of moejax.routers.names() ('top_k', 'deepseek', 'expert_choice',
  # 'soft_moe', 'hash', 'dense', and any registered since).
  e.router = "top_k"
  e.num_experts = 8
  e.d_expert = 0  # 0: model.d_ff. Fine-grained experts: many experts, small d_expert, larger K.
  e.num_shared_experts = 0  # Always-on experts of hidden size d_expert (DeepSeekMoE).
  # 'none' | 'sigmoid': the shared experts' output × sigmoid(x·w), w [d] learned (Qwen2-MoE).
  e.shared_expert_gate = "none"
  e.expert_bias = False  # Biases on the experts' projections, zero-initialised (gpt-oss).
  e.group_size = 0  # Tokens per routing group; 0 = one sequence (or image) per group.
  e.allow_noncausal = False  # Allow a router setting that lets a decoder see the future.
  e.dead_expert_steps = 100  # An expert with no tokens for this many steps counts as dead.
  # Options of the dispatchers (DISPATCHER_OPTIONS). Token permutation of 'sort' and 'dropless':
  # 'auto' (XLA until the Pallas kernels are measured on hardware) | 'xla' | 'pallas' (Triton on
  # GPU, Mosaic on TPU, interpreted on CPU: slow).
  e.permute_backend = "auto"
  e.dropless_impl = "auto"  # 'auto' | 'blocks' (B-row block loop) | 'ragged_dot' (grouped matmul) | 'gather' (few rows)
  e.dropless_block_size = 64  # Rows per block of dropless_impl='blocks'.
  # Dropless with mesh.expert > 1: 'auto' (ragged on GPU/TPU, padded on CPU) | 'padded' (all_to_all
  # of N rows per device pair, runs anywhere) | 'ragged' (jax.lax.ragged_all_to_all; GPU/TPU only).
  e.expert_exchange = "auto"
  # Every router family's options (top_k, capacity_factor, priority, slots_per_expert, ...): their
  # defaults and meanings are in the family modules, moejax/routers/*.py.
  for option in routers.options().values():
    if option.name in e:
      raise ValueError(
        f"router family option moe.{option.name} would replace a field every family reads; give it another name"
      )
    e[option.name] = option.default
  return e


def _optim() -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.learning_rate = 3e-3  # Peak, after linear warm-up.
  o.warmup_steps = 100
  o.schedule = "cosine"  # 'cosine' (decay to end_lr_fraction·peak at the last step) | 'constant'
  o.end_lr_fraction = 0.1  # Cosine only.
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.grad_clip_norm = 1.0  # Global-norm clipping; 0 = off.
  # Fine-tuning (`moejax.finetune`): parameter groups that get no update (FREEZE_GROUPS: 'experts',
  # 'router', 'non_experts', 'attention', 'embeddings'; ST-MoE §5 fine-tunes with the experts
  # frozen), and regular expressions over dotted paths for any other choice.
  o.freeze = ()
  o.freeze_patterns = ()
  return o


def _train(task: str) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.batch_size = 32  # Global, in sequences or images.
  if task == "lm":
    t.seq_len = 128
  t.num_steps = 1000
  t.log_every = 50
  t.eval_every = 250  # 0: evaluate only at the end.
  t.checkpoint_every = 250
  t.keep_checkpoints = 3
  # Step s trains on batch data_offset + s of the seed's stream: a run that continues another's
  # weights on the same data (init.checkpoint) sets it to the steps that run took, to go on to new batches.
  t.data_offset = 0
  # Gradient accumulation: each step's batch runs as this many equal micro-batches, one after the
  # other (a lax.scan), their gradients, metrics and MoE statistics averaged before the one update
  # (a share, such as an expert's share of the kept choices, is the mean of the micro-batches' shares).
  # Routing groups form within a micro-batch; with one sequence per group and
  # moe.load_balance_scope 'group' (the defaults) the step equals the whole batch's.
  t.microbatches = 1
  # The dtype the forward and backward pass read the parameters in: 'float32' | 'bfloat16' (a
  # bfloat16 copy of every floating parameter but the routers', made each step; gradients come
  # in bfloat16 and are cast up). The parameters themselves (the master weights) and the
  # optimizer state stay float32. With model.dtype 'bfloat16' too: bfloat16 compute throughout.
  t.param_dtype = "float32"
  # A jax.profiler trace of steps profile_start .. profile_start + profile_steps - 1 in
  # <workdir>/profile (TensorBoard's profile plugin or XProf; the MoE layer's parts appear as the
  # named scopes router, dispatch, experts, combine and all_to_all). 0: no trace. Pick steps after
  # the first, which compiles.
  t.profile_start = 0
  t.profile_steps = 3
  return t


def _init() -> ml_collections.ConfigDict:
  # Where a new run's parameters come from (`moejax.init`): '' draws them from the seed; a path
  # takes them from a converted model (python -m moejax.convert from-hf), another run's workdir
  # (its newest checkpoint, or init.step) or one step of a run. Parameters only: the optimizer
  # starts afresh at step 0. Resuming in the run's own workdir ignores none of this: the workdir's
  # checkpoint is newer than the init, so it is what the run resumes from.
  i = ml_collections.ConfigDict()
  i.checkpoint = ""
  i.step = 0  # In a run's workdir: which checkpoint; 0: the newest.
  # Which parameters to take, as regular expressions over dotted paths (blocks.3.ffn.wi, embed.embedding,
  # ...; re.fullmatch). include () takes every parameter; exclude leaves the matches at their fresh
  # initialisation (and skips the checkpoint's arrays that match). Anything else that does not line up is refused.
  i.include = ()
  i.exclude = ()
  # Sparse upcycling (Komatsuzaki et al. 2023): an MoE layer's experts start as copies of the
  # checkpoint's dense FFN of that block; what the dense block lacks (its router, Soft MoE's slot
  # parameters, shared experts) starts fresh from the seed, as the paper's new router does. upcycle_noise: each copy plus Gaussian noise of
  # that std relative to the array's own std (0: exact copies). upcycle_segments m: fine-grained
  # upcycling, the FFN's hidden units split into m segments, expert e taking segment e mod m
  # (moe.d_expert must be the checkpoint's d_ff / m).
  i.upcycle = False
  i.upcycle_noise = 0.0
  i.upcycle_segments = 1
  return i


def _lora() -> ml_collections.ConfigDict:
  # LoRA adapters (`moejax.lora`, Hu et al. 2021): each targeted weight W runs as W + (alpha/rank)·A·B,
  # A [in, rank] ~ N(0, 1/in), B [rank, out] = 0; a routed expert array gets one adapter per expert.
  # With rank > 0 the base model is frozen but for the groups of `train` (FREEZE_GROUPS, e.g.
  # 'router'), and optim.freeze is not used.
  l = ml_collections.ConfigDict()
  l.rank = 0  # 0: no adapters.
  l.alpha = 8.0  # The update is scaled by alpha / rank.
  # LORA_GROUPS: attention, ffn (= experts and dense_ffn), experts, dense_ffn, router; each must match.
  l.targets = ("attention", "ffn")
  l.patterns = ()  # Regular expressions over dotted paths of other weights to adapt (re.fullmatch).
  l.train = ()  # Base-parameter groups (FREEZE_GROUPS) trained beside the adapters,
  l.train_patterns = ()  # and regular expressions over dotted paths of others (e.g. a ViT's 'head\\..*').
  return l


def _mesh() -> ml_collections.ConfigDict:
  # Devices: a ('data', 'expert', 'model') mesh. Batches (and MoE groups) are split over 'data'
  # and 'expert'; expert weights over 'expert' (E/expert experts per device); with model > 1
  # (tensor parallelism) the weights' dimensions that mesh.rules names over 'model'; other weights
  # replicated or, with fsdp, split over 'data' too. See README "Scaling out".
  m = ml_collections.ConfigDict()
  m.data = -1  # Devices on the data axis; -1: all devices / (mesh.expert × mesh.model).
  m.expert = 1  # Devices on the expert axis (expert parallelism); must divide moe.num_experts.
  m.model = 1  # Devices on the model axis (tensor parallelism): heads and hidden dims split as mesh.rules says.
  m.fsdp = False  # Also split non-expert weights and optimizer state over 'data' (ZeRO-3 style).
  # Logical axis rules: the mesh axis each named weight dimension is split over, 'model' or ''
  # (replicated). A dimension that 'model' does not divide stays whole.
  m.rules = ml_collections.ConfigDict()
  m.rules.heads = "model"  # Query heads: attention's q (and MLA's q/kv up-projections) and output projection.
  m.rules.kv_heads = "model"  # Key/value heads of grouped-query attention.
  m.rules.mlp = "model"  # The hidden dimension of dense FFNs and shared experts.
  m.rules.expert_mlp = "model"  # The experts' hidden dimension f (their partial outputs summed over 'model').
  m.rules.vocab = "model"  # The vocabulary of the embedding table and the output head.
  return m


def _distributed() -> ml_collections.ConfigDict:
  # Multi-host (one process per host or per GPU): `jax.distributed.initialize` before JAX starts.
  d = ml_collections.ConfigDict()
  # 'auto': initialize when a coordinator address is given (here or $JAX_COORDINATOR_ADDRESS) or a
  # multi-process cluster is detected (Cloud TPU pod slice, SLURM, Open MPI); 'yes' | 'no'.
  d.initialize = "auto"
  d.coordinator_address = ""  # host:port of process 0; '': from the cluster / environment.
  d.num_processes = 0  # 0: from the cluster / environment.
  d.process_id = -1  # -1: from the cluster / environment.
  return d


def defaults(task: str, section: str) -> dict:
  """{field: default} of one section of `base_config(task)` (what the model dataclasses default to)."""
  return _defaults(task, tuple(routers.names()))[section]


@functools.lru_cache(maxsize=None)
def _defaults(task: str, families: tuple[str, ...]) -> dict:
  """base_config(task) as a dict, cached per set of registered families (a new family adds options)."""
  return base_config(task).to_dict()


def active_fields(cfg) -> set[str]:
  """The 'section.field' names that the run reads, given the selectors (router, dispatcher, source, ...).

  Every field of model, train, mesh, distributed and the top level is always active, as are the
  moe fields every family reads; the rest depends on:
    moe.router       its family's options, but for those the settings leave unread
                     (`RouterFamily.unused_options`); no moe field when the model has no MoE layer
    dispatcher       DISPATCHER_OPTIONS of the dispatcher the family uses (`RouterFamily.dispatcher`)
    data.source      its subsection (data.markov, data.text, data.tfds, data.digits)
    optim.schedule   optim.end_lr_fraction under 'cosine'
    task             moe.allow_noncausal in a decoder only
  """
  return set(flatten(cfg)) - set(inactive_fields(cfg))


def moe_layer_indices(model) -> list[int]:
  """The 0-based blocks whose FFN is an MoE layer, from the config's `model` section (or a model dataclass).

  Decoder: every P-th block (P = moe_every: blocks P-1, 2P-1, ...) but those in dense_layers;
  ViT: the last moe_last blocks, or every P-th.
  """
  moe_last, every = getattr(model, "moe_last", 0), model.moe_every
  if moe_last:
    return list(range(model.num_layers - moe_last, model.num_layers))
  dense = set(getattr(model, "dense_layers", ()))
  return [i for i in range(model.num_layers) if every > 0 and i % every == every - 1 and i not in dense]


def has_moe_layers(cfg) -> bool:
  """Whether the model has an MoE layer (model.moe_every and model.dense_layers, or the ViT's model.moe_last)."""
  return bool(moe_layer_indices(cfg.model))


def inactive_fields(cfg) -> dict[str, str]:
  """{'section.field': why the run does not read it} (the complement of `active_fields`)."""
  flat = flatten(cfg)
  why = {}
  if not has_moe_layers(cfg):
    reason = "the model has no MoE layer: " + (
      "model.moe_every is 0" if cfg.model.moe_every == 0 else "model.dense_layers holds every MoE block"
    )
    why.update({f: reason for f in flat if f.startswith("moe.")})
    if cfg.model.moe_every == 0 and "model.dense_layers" in flat:
      why["model.dense_layers"] = "model.moe_every is 0: every block is dense already"
  else:
    selected = routers.get(cfg.moe.router) if cfg.moe.router in routers.names() else None
    own = {o.name for o in selected.options} if selected else set()
    for option in routers.options():
      if option not in own:
        owners = " / ".join(map(repr, routers.owners(option)))
        why[f"moe.{option}"] = f"an option of router {owners}, and moe.router is {cfg.moe.router!r}"
    if selected:
      why.update({f"moe.{name}": reason for name, reason in selected.unused_options(cfg.moe).items()})
    dispatcher = selected.dispatcher(cfg.moe) if selected else None
    for name in sorted({n for names in DISPATCHER_OPTIONS.values() for n in names}):
      if name not in DISPATCHER_OPTIONS.get(dispatcher, ()):
        users = " / ".join(repr(d) for d, names in DISPATCHER_OPTIONS.items() if name in names)
        why[f"moe.{name}"] = f"an option of dispatcher {users}, and router {cfg.moe.router!r} uses {dispatcher!r}"
    if cfg.task != "lm":
      why["moe.allow_noncausal"] = "only a decoder is causal; the ViT sees every token"
  m = cfg.model
  if "model.attention" in flat:
    for kind, names in ATTENTION_OPTIONS.items():
      if kind != m.attention:
        why.update({f"model.{n}": f"an option of model.attention {kind!r}, and it is {m.attention!r}" for n in names})
    if m.attention == "mha" and m.sliding_window == 0:
      why["model.full_attention_every"] = "model.sliding_window is 0: every block attends to all keys"
    if m.positions != "rope":
      rope_fields = ("rope_theta", "rope_interleaved", "rope_scaling", *YARN_FIELDS)
      why.update({f"model.{n}": f"model.positions is {m.positions!r}, not 'rope'" for n in rope_fields})
    elif m.rope_scaling != "yarn":
      why.update({f"model.{n}": f"model.rope_scaling is {m.rope_scaling!r}, not 'yarn'" for n in YARN_FIELDS})
  if "model.parallel_dense_d_ff" in flat and not has_moe_layers(cfg):
    why["model.parallel_dense_d_ff"] = "the model has no MoE block for a dense FFN to run beside"
  if "model.mtp_loss_weight" in flat and m.mtp_depth == 0:
    why["model.mtp_loss_weight"] = "model.mtp_depth is 0: no multi-token prediction"
  if "model.qk_norm_scope" in flat and not cfg.model.qk_norm and "model.qk_norm_scope" not in why:
    why["model.qk_norm_scope"] = "model.qk_norm is False"
  if has_moe_layers(cfg) and cfg.moe.num_shared_experts == 0:
    why["moe.shared_expert_gate"] = "moe.num_shared_experts is 0"
  source_section = DATA_SUBSECTIONS.get(cfg.data.source)
  for key, value in cfg.data.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)) and key != source_section:
      why.update({f: f"data.source is {cfg.data.source!r}" for f in flat if f.startswith(f"data.{key}.")})
  if "init.checkpoint" in flat and not cfg.init.checkpoint:
    why.update(
      {
        f"init.{n}": "init.checkpoint is '': the parameters start from the seed"
        for n in ("step", "include", "exclude", "upcycle", "upcycle_noise", "upcycle_segments")
      }
    )
  elif "init.upcycle" in flat and not cfg.init.upcycle:
    why.update({f"init.{n}": "init.upcycle is False" for n in ("upcycle_noise", "upcycle_segments")})
  if "lora.rank" in flat and cfg.lora.rank == 0:
    why.update(
      {f"lora.{n}": "lora.rank is 0: no adapters" for n in ("alpha", "targets", "patterns", "train", "train_patterns")}
    )
  if cfg.optim.schedule != "cosine":
    why["optim.end_lr_fraction"] = f"optim.schedule is {cfg.optim.schedule!r}; the end value applies to 'cosine'"
  return why


def flatten(tree, prefix: str = "") -> dict:
  """{'section.field': value} of a config or a nested dict (a config's to_dict())."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat
