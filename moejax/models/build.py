"""The layer and model dataclasses built from a config (their defaults are the schema's, too)."""

from __future__ import annotations

import dataclasses

import ml_collections

from moejax.errors import ConfigError
from moejax.layers.moe import MoEConfig
from moejax.models.decoder import DecoderConfig
from moejax.models.vit import ViTConfig


def moe_config(cfg: ml_collections.ConfigDict) -> MoEConfig:
  """The MoE layers' static config: every moe.* field, d_expert resolved, the model.* and mesh.rules fields it reads."""
  fields = {f.name for f in dataclasses.fields(MoEConfig)}
  missing = sorted(set(cfg.moe.keys()) - fields)
  if missing:
    raise ConfigError(
      f"moe.{missing[0]}",
      "belongs to a router family registered after moejax.layers.moe was "
      "imported; import the family's module before moejax's models",
    )
  derived = dict(
    d_expert=cfg.moe.d_expert or cfg.model.d_ff,
    activation=cfg.model.activation,
    init_scale=cfg.model.init_scale,
    remat=cfg.model.remat,
    expert_mlp_axis=cfg.mesh.rules.expert_mlp,
  )
  return MoEConfig(**{**cfg.moe.to_dict(), **derived})


def decoder_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> DecoderConfig:
  """The decoder's static config; vocab_size is used when model.vocab_size is 0."""
  m = cfg.model
  fields = {f.name for f in dataclasses.fields(DecoderConfig)} - {"vocab_size", "max_len", "moe"}
  return DecoderConfig(
    vocab_size=m.vocab_size or vocab_size,
    max_len=cfg.train.seq_len,
    moe=moe_config(cfg),
    **{name: m[name] for name in fields},
  )


def vit_config(cfg: ml_collections.ConfigDict, image_shape, num_classes: int, num_mesh_devices: int = 1) -> ViTConfig:
  """The ViT's static config for images of `image_shape` [H, W, C]; raises ConfigError if they don't fit."""
  m, e = cfg.model, cfg.moe
  height, width, channels = image_shape
  if not (height == width and height % m.patch_size == 0):
    raise ConfigError("model.patch_size", f"must divide the {height}×{width} images, got {m.patch_size}")
  fields = {f.name for f in dataclasses.fields(ViTConfig)} - {"image_size", "channels", "num_classes", "moe"}
  vit = ViTConfig(
    image_size=height,
    channels=channels,
    num_classes=num_classes,
    moe=moe_config(cfg),
    **{name: m[name] for name in fields},
  )
  group = e.group_size or vit.num_tokens
  if not (vit.num_tokens % group == 0 or group % vit.num_tokens == 0):
    raise ConfigError(
      "moe.group_size", f"must divide the {vit.num_tokens} tokens per image or be a multiple of it, got {e.group_size}"
    )
  tokens = cfg.train.batch_size // cfg.train.microbatches * vit.num_tokens  # A micro-batch runs as a batch.
  if not (tokens % group == 0 and (tokens // group) % num_mesh_devices == 0):
    raise ConfigError(
      "moe.group_size",
      f"the {'micro-' if cfg.train.microbatches > 1 else ''}batch's {tokens} tokens must split into groups "
      f"of {group} whose count is divisible by the mesh's {num_mesh_devices} data × expert devices",
    )
  return vit
