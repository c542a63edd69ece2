"""Tasks: what the trainer trains. Each knows its data, model, loss, eval metrics and summary.

  'lm'   decoder-only language model on `moejax.data.pipeline` (next-token cross-entropy;
         eval compared with the unigram baseline and, on the Markov mixture, the Bayes floor).
  'vit'  ViT image classifier on `moejax.data.images` (cross-entropy and accuracy; eval
         compared with chance and majority-class accuracy).
Both add the MoE auxiliary losses (`moe_losses_and_metrics`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from moejax import accounting, losses
from moejax.models import build

TASKS = ("lm", "vit")


def moe_losses_and_metrics(moe_aux: list[dict], moe_cfg) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted sum of the MoE auxiliary losses (each summed over MoE layers, or the load balance
  pooled over them with moe.load_balance_pooling='all_layers') and per-layer metrics."""
  if not moe_aux:
    return jnp.zeros(()), {}
  # Every '<name>_loss' of the aux with a moe.<name>_loss_weight: the Switch, z, importance and load
  # losses of every family, and a family's own (DeepSeek-V2's device and communication balance).
  weights = {
    name: getattr(moe_cfg, f"{name}_weight")
    for name in moe_aux[0]
    if name.endswith("_loss") and hasattr(moe_cfg, f"{name}_weight")
  }
  metrics, total = {}, jnp.zeros(())
  for name, weight in weights.items():
    metrics[name] = sum(a[name] for a in moe_aux)
    if name == "load_balance_loss" and "balance_fraction" in moe_aux[0]:  # load_balance_pooling 'all_layers'
      fractions, probs = (jnp.stack([a[key] for a in moe_aux]) for key in ("balance_fraction", "balance_prob"))
      metrics[name] = losses.pooled_load_balance(fractions, probs)
    total = total + weight * metrics[name]
  for i, aux in enumerate(moe_aux):
    prefix = f"moe_layer{i}/"
    for name, value in aux.items():
      if name == "fraction_dropped":
        for rank, dropped in enumerate(value):
          metrics[prefix + f"fraction_dropped_choice{rank + 1}"] = dropped
      elif name == "expert_load":
        metrics[prefix + "max_over_mean_load"] = value.max() / value.mean()
        metrics[prefix + "min_over_mean_load"] = value.min() / value.mean()
        for e in range(value.shape[0]):  # Each expert's share of the kept assignments.
          metrics[prefix + f"load_e{e:03d}"] = value[e]
      elif value.ndim == 0:
        metrics[prefix + name] = value
  return total, metrics


def _cross_entropy_and_moe_losses(logits, labels, moe_aux, moe_cfg):
  """(loss, metrics): mean cross-entropy of integer labels plus the MoE auxiliary losses."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  aux_loss, metrics = moe_losses_and_metrics(moe_aux, moe_cfg)
  metrics["cross_entropy"] = ce
  metrics["loss"] = ce + aux_loss
  return metrics["loss"], metrics


class LMTask:
  """Next-token prediction with a DecoderLM."""

  def __init__(self, cfg: ml_collections.ConfigDict, data):
    self.cfg, self.data = cfg, data
    self.model_cfg = build.decoder_config(cfg, data.vocab_size)
    self.tokens_per_example = cfg.train.seq_len

  def make_model(self, mesh, rngs):
    from moejax.models.decoder import DecoderLM

    return DecoderLM(self.model_cfg, mesh=mesh, rngs=rngs)

  def cost(self) -> accounting.ModelCost:
    return accounting.decoder_cost(self.model_cfg)

  def loss(self, model, batch, train: bool, rng=None):
    """(loss, metrics, moe_aux): cross-entropy plus the MoE auxiliary losses (and λ·MTP loss)."""
    logits, moe_aux, mtp_logits = model.forward(batch["inputs"], train=train, rng=rng)
    loss, metrics = _cross_entropy_and_moe_losses(logits, batch["targets"], moe_aux, self.cfg.moe)
    if mtp_logits:
      metrics["mtp_loss"] = losses.multi_token_prediction_loss(mtp_logits, batch["targets"])
      metrics["loss"] = loss = loss + self.model_cfg.mtp_loss_weight * metrics["mtp_loss"]
    return loss, metrics, moe_aux

  def eval_metrics(self, model, batch) -> dict[str, jax.Array]:
    _, metrics, _ = self.loss(model, batch, train=False)
    return {"cross_entropy": metrics["cross_entropy"]}

  def baselines(self) -> dict[str, float]:
    info = self.data.info
    out = {"unigram_loss": info["unigram_loss"]}
    if info.get("bayes_floor") is not None:
      out["bayes_floor"] = info["bayes_floor"]
    return out

  def derived_eval(self, scalars: dict[str, float]) -> dict[str, float]:
    floor = self.data.info.get("bayes_floor")
    return {} if floor is None else {"gap_to_bayes_floor": scalars["cross_entropy"] - floor}


class ViTTask:
  """Image classification with a ViT."""

  def __init__(self, cfg: ml_collections.ConfigDict, data, num_mesh_devices: int = 1):
    self.cfg, self.data = cfg, data
    self.model_cfg = build.vit_config(cfg, data.image_shape, data.num_classes, num_mesh_devices)
    self.tokens_per_example = self.model_cfg.num_tokens

  def make_model(self, mesh, rngs):
    from moejax.models.vit import ViT

    return ViT(self.model_cfg, mesh=mesh, rngs=rngs)

  def cost(self) -> accounting.ModelCost:
    return accounting.vit_cost(self.model_cfg)

  def loss(self, model, batch, train: bool, rng=None):
    logits, moe_aux = model(batch["images"], train=train, rng=rng)
    loss, metrics = _cross_entropy_and_moe_losses(logits, batch["labels"], moe_aux, self.cfg.moe)
    metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
    return loss, metrics, moe_aux

  def eval_metrics(self, model, batch) -> dict[str, jax.Array]:
    _, metrics, _ = self.loss(model, batch, train=False)
    return {"cross_entropy": metrics["cross_entropy"], "accuracy": metrics["accuracy"]}

  def baselines(self) -> dict[str, float]:
    info = self.data.info
    return {"chance_accuracy": info["chance_accuracy"], "majority_class_accuracy": info["majority_class_accuracy"]}

  def derived_eval(self, scalars: dict[str, float]) -> dict[str, float]:
    return {}


def make_data(cfg: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1):
  """The task's dataset for this process (raises ValueError/FileNotFoundError on bad data settings)."""
  if cfg.task == "vit":
    from moejax.data import images

    return images.make_image_data(
      cfg.data,
      global_batch_size=cfg.train.batch_size,
      seed=cfg.seed,
      process_index=process_index,
      process_count=process_count,
    )
  from moejax.data import pipeline

  return pipeline.make_lm_data(
    cfg.data,
    seq_len=cfg.train.seq_len,
    global_batch_size=cfg.train.batch_size,
    seed=cfg.seed,
    process_index=process_index,
    process_count=process_count,
  )


def vocab_size_without_data(cfg: ml_collections.ConfigDict) -> int:
  """The vocabulary an LM's data source gives, known without preparing it (Markov mixture: its
  vocab_size; bytes and TFDS text: 256), for counting and planning a model without its data."""
  return cfg.data.markov.vocab_size if cfg.data.source == "markov_mixture" else 256


def make_task(cfg: ml_collections.ConfigDict, data, num_mesh_devices: int = 1):
  """The task of `cfg` on `data`; raises ConfigError if the model does not fit the data or the mesh."""
  return ViTTask(cfg, data, num_mesh_devices) if cfg.task == "vit" else LMTask(cfg, data)
