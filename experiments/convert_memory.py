"""Peak memory of `python -m moejax.convert` against the model's size: it streams one decoder layer at a time.

  python -m experiments.convert_memory [--layers 8] [--d_model 512] [--d_ff 1792] [--experts 8]
                                       [--vocab 32000] [--dtype bfloat16] [--max_shard_size 200MB]

Writes a random Mixtral-architecture checkpoint as a Hugging Face directory (sharded, as released
models are), converts it to moejax (from-hf) and back (to-hf), each in a fresh process, and prints
what each process held at its peak above what it held before converting (Linux: the peak resident
set, VmHWM, reset through /proc/self/clear_refs once JAX and the libraries are loaded), next to
the model's size, its largest tensor and its largest layer. The converter must stay near a layer
(and a shard, when writing), not grow with the model.

Measured on 2026-12-04 on the 2-core, no-GPU development machine (Python 3.11, jax 0.10.2,
orbax-checkpoint 0.12.8), defaults (8 layers, d 512, 8 experts of 1792, vocabulary 32000,
bfloat16: 436 MB in 3 shards):
  see the table this script prints; the README's "Checkpoints in and out" section quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from experiments import memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(path: str, layers: int, d: int, f: int, experts: int, vocab: int, dtype: str, shard: int) -> dict:
  """A random Mixtral-architecture model directory; returns its sizes (bytes)."""
  import ml_dtypes
  import numpy as np

  from moejax.convert import files

  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  heads, kv_heads = max(d // 64, 1), max(d // 256, 1)
  head_dim = d // heads
  config = {
    "model_type": "mixtral",
    "vocab_size": vocab,
    "hidden_size": d,
    "intermediate_size": f,
    "num_hidden_layers": layers,
    "num_attention_heads": heads,
    "num_key_value_heads": kv_heads,
    "head_dim": head_dim,
    "num_local_experts": experts,
    "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    "sliding_window": None,
    "router_aux_loss_coef": 0.02,
    "router_jitter_noise": 0.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
  }
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(config, fh)
  rng = np.random.default_rng(0)
  writer = files.ShardWriter(path, shard)
  sizes = {"model": 0, "largest_tensor": 0, "largest_layer": 0}

  def add(name, shape):
    array = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype)
    writer.add(name, array)
    sizes["model"] += array.nbytes
    sizes["largest_tensor"] = max(sizes["largest_tensor"], array.nbytes)
    return array.nbytes

  add("model.embed_tokens.weight", (vocab, d))
  add("model.norm.weight", (d,))
  add("lm_head.weight", (vocab, d))
  for i in range(layers):
    p = f"model.layers.{i}"
    layer = add(f"{p}.input_layernorm.weight", (d,)) + add(f"{p}.post_attention_layernorm.weight", (d,))
    layer += add(f"{p}.self_attn.q_proj.weight", (heads * head_dim, d))
    layer += add(f"{p}.self_attn.k_proj.weight", (kv_heads * head_dim, d))
    layer += add(f"{p}.self_attn.v_proj.weight", (kv_heads * head_dim, d))
    layer += add(f"{p}.self_attn.o_proj.weight", (d, heads * head_dim))
    layer += add(f"{p}.mlp.gate.weight", (experts, d))
    layer += add(f"{p}.mlp.experts.gate_up_proj", (experts, 2 * f, d))  # transformers 5's fused layout
    layer += add(f"{p}.mlp.experts.down_proj", (experts, d, f))
    sizes["largest_layer"] = max(sizes["largest_layer"], layer)
  sizes["files"] = len(writer.close())
  return sizes


def _measure(command: str, source: str, out: str, max_shard: int) -> None:
  """Runs one conversion in this process and prints {'peak_above_start': bytes} as JSON."""
  import jax  # noqa: F401 - loaded before the baseline, as the converter loads it anyway.
  import orbax.checkpoint  # noqa: F401

  from moejax.convert import checkpoints
  from moejax.models.decoder import DecoderLM  # noqa: F401

  start = memory.reset_peak()
  if command == "from-hf":
    checkpoints.from_hf(source, out, say=lambda *a: None)
  else:
    checkpoints.to_hf(source, out, max_shard_bytes=max_shard, say=lambda *a: None)
  print(json.dumps({"peak_above_start": memory.peak() - start, "start": start}))


def measure(layers: int, args) -> dict:
  """The checkpoint's sizes (`layers` deep) and each direction's peak memory above its start (bytes)."""
  from moejax.convert import files

  max_shard = files.parse_size(args.max_shard_size)
  with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
    hf_dir, converted, back = (os.path.join(tmp, n) for n in ("hf", "moejax", "back"))
    sizes = write_checkpoint(hf_dir, layers, args.d_model, args.d_ff, args.experts, args.vocab, args.dtype, max_shard)
    peaks = {}
    for command, source, out in (("from-hf", hf_dir, converted), ("to-hf", converted, back)):
      result = subprocess.run(
        [sys.executable, "-m", "experiments.convert_memory", "--_measure", command, source, out, str(max_shard)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
      )
      peaks[command] = json.loads(result.stdout.strip().splitlines()[-1])["peak_above_start"]
  return {**sizes, "layers": layers, "max_shard": max_shard, "peaks": peaks}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", default="8,24", help="two depths, comma-separated: the peak must not grow with depth")
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--d_ff", type=int, default=1792)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--max_shard_size", default="200MB")
  parser.add_argument("--tmp", default=None, help="where to write the checkpoints (default: the system's)")
  parser.add_argument("--_measure", nargs=4, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._measure:
    command, source, out, max_shard = args._measure
    _measure(command, source, out, int(max_shard))
    return
  shallow, deep = (measure(int(n), args) for n in args.layers.split(","))
  mb = lambda n: f"{n / 1e6:,.0f} MB"
  print(
    f"largest tensor {mb(deep['largest_tensor'])} | largest layer {mb(deep['largest_layer'])} | "
    f"max shard {mb(deep['max_shard'])} | {args.dtype}"
  )
  print("| direction | layers | model | peak above start | peak / model | peak growth / model growth |")
  print("|:---|---:|---:|---:|---:|---:|")
  for command in ("from-hf", "to-hf"):
    growth = (deep["peaks"][command] - shallow["peaks"][command]) / (deep["model"] - shallow["model"])
    for r in (shallow, deep):
      peak = r["peaks"][command]
      print(
        f"| {command} | {r['layers']} | {mb(r['model'])} | {mb(peak)} | {peak / r['model']:.2f} | "
        + (f"{growth:.3f} |" if r is deep else "|")
      )
  print(json.dumps({"shallow": shallow, "deep": deep}))


if __name__ == "__main__":
  main()
