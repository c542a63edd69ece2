"""The memory planner (`moejax.plan`): its state bytes are the real arrays', its compiled step is
the real step's, its totals are near a measured peak, its refusals are one line, and its formula
keeps less under remat 'full'.

Sizes: a 2-block MoE decoder (d 64, 4 experts, tensor-parallel heads and hidden dims) on a data 2
× expert 2 × model 2 mesh of the 8 fake CPU devices (tests/conftest.py).
"""

import gc
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from moejax import plan as plan_lib
from moejax import tasks, train
from moejax.config import base_config, override
from moejax.models import build
from moejax.plan import DEVICES, estimate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 256
TINY = {
  "model.num_layers": 2,
  "model.d_model": 64,
  "model.num_heads": 4,
  "model.d_ff": 128,
  "model.moe_every": 1,
  "model.vocab_size": VOCAB,
  "moe.num_experts": 4,
  "train.batch_size": 8,
  "train.seq_len": 32,
}


def tiny(**fields):
  return override(base_config("lm"), {**TINY, **fields})


@pytest.fixture(scope="module")
def planned():
  """(config, plan) on data 2 × expert 2 × model 2 with FSDP: every mesh axis splits some array."""
  cfg = tiny(**{"mesh.data": 2, "mesh.expert": 2, "mesh.model": 2, "mesh.fsdp": True})
  return cfg, plan_lib.make_plan(cfg, DEVICES["h100-80gb"])


def _bytes_on(tree, device) -> int:
  """Bytes of `tree`'s arrays that live on `device` (its addressable shards there)."""
  return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)


def test_state_bytes_are_the_initialized_arrays(planned):
  cfg, plan = planned
  trainer = train.Trainer(cfg, tasks.make_task(cfg, plan_lib.data_stand_in(cfg), 4))  # Initialized: real arrays.
  for device in trainer.mesh.devices.flat:
    assert _bytes_on(trainer.state["params"], device) == plan.state["params"]
    assert _bytes_on(trainer.state["opt_state"], device) == plan.state["opt_state"]
  total = sum(x.nbytes for x in jax.tree.leaves(trainer.state["params"]))
  # Every weight matrix is split two ways at least (experts over 'expert', heads and hidden over
  # 'model', the rest over 'data'), so a device holds well under half the parameters.
  assert plan.state["params"] < total / 2
  # Adam: two float32 moments per parameter, and two int32 step counts (Adam's and the schedule's).
  assert plan.state["opt_state"] == 2 * plan.state["params"] + 8
  assert plan.setup["state_matches_xla_arguments"]


def test_compiled_step_is_the_real_steps(planned):
  """The abstract lowering compiles the program a real step runs: XLA's sizes agree."""
  cfg, plan = planned
  trainer = train.Trainer(cfg, tasks.make_task(cfg, plan_lib.data_stand_in(cfg), 4))
  tokens = np.random.default_rng(0).integers(0, VOCAB, (8, 32), dtype=np.int32)
  batch = trainer.shard_batch({"inputs": tokens, "targets": tokens})
  memory = trainer._train_step.lower(trainer.state, batch).compile().memory_analysis()
  assert plan.compiled["argument"] == memory.argument_size_in_bytes
  # The plan's step leaves the metrics out (`moejax.plan.state_update`), which moves XLA's buffer
  # assignment a little (here +15 KB of 1.26 MB).
  assert abs(plan.compiled["temp"] - memory.temp_size_in_bytes) <= 0.02 * memory.temp_size_in_bytes
  assert plan.compiled["output"] - plan.compiled["alias"] <= memory.output_size_in_bytes - memory.alias_size_in_bytes


def test_totals_near_the_measured_peak():
  """One device, in a fresh process: state + the step's peak resident growth (VmHWM) against the plan.

  Measured 2026-12-05 on the 2-core VM: state + growth was 1.00-1.04× the compiled peak (five
  runs; 1.05× at L = 512), once the earlier steps' arrays are collected (without the gc.collect
  it was 0.2-0.5×: their freed memory is reused unseen). On 8 fake devices in one process the
  growth was only 0.12× of 8 × temp (not established why; the fake devices may not all hold
  their temp at once), hence one device. The analytic peak is 0.84× the compiled one here and 0.62× at L = 512 (XLA:CPU holds
  more of the attention's L×L buffers at once than the formula's one block).
  """
  script = os.path.join(REPO, "tests", "test_plan.py")
  result = subprocess.run(
    [sys.executable, script, "measure"],
    check=False,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  measured, compiled, analytic = (float(x) for x in result.stdout.split()[-3:])
  assert 0.8 <= measured / compiled <= 1.25, (measured, compiled)
  assert 0.4 <= analytic / compiled <= 2.0, (analytic, compiled)


def _measure() -> None:
  """(run as a script) Prints measured, compiled and analytic peak bytes of the one-device step."""
  jax.config.update("jax_num_cpu_devices", 1)
  sys.path.insert(0, REPO)
  from experiments import memory

  # Large enough that XLA's temp (~180 MB) is one mmap'd block, which glibc returns to the OS when freed.
  cfg = tiny(**{"mesh.data": 1, "model.num_layers": 4, "model.d_model": 128, "model.d_ff": 256,
                "train.batch_size": 16, "train.seq_len": 128})  # fmt: skip
  plan = plan_lib.make_plan(cfg, DEVICES["h100-80gb"])
  trainer = train.Trainer(cfg, tasks.make_task(cfg, plan_lib.data_stand_in(cfg), 1))
  tokens = np.random.default_rng(0).integers(0, VOCAB, (16, 128), dtype=np.int32)
  batch = trainer.shard_batch({"inputs": tokens, "targets": tokens})
  for _ in range(2):  # Compiled and run before measuring.
    trainer.state, metrics = trainer._train_step(trainer.state, batch)
    jax.block_until_ready(metrics)
  gc.collect()
  start = memory.reset_peak()
  for _ in range(2):
    trainer.state, metrics = trainer._train_step(trainer.state, batch)
    jax.block_until_ready(metrics)
  resident = sum(x.nbytes for x in jax.tree.leaves((trainer.state, batch)))
  print(resident + memory.peak() - start, plan.compiled["peak"], plan.analytic["peak"])


def _shape(**fields) -> estimate.Shape:
  values = {"sequences": 2, "seq_len": 16, "activation_bytes": 4, "model_devices": 1, "expert_devices": 1}
  return estimate.Shape(**{**values, "rules": {}, "platform": "gpu", **fields})


def test_full_remat_keeps_only_block_inputs():
  model_cfg = build.decoder_config(tiny(**{"model.d_model": 32, "model.num_heads": 2}), VOCAB)
  none, full = (estimate.activations(model_cfg, _shape(), policy) for policy in ("none", "full"))
  # 'full': each of the 2 blocks keeps its input, 2 sequences × 16 tokens × d 32 × 4 bytes = 4096 bytes.
  assert full.kept == 2 * 4096
  assert full.per_term == {"block input": 2 * 4096}
  assert full.total < none.total
  # What 'full' drops it recomputes one block at a time: the working set grows by those terms.
  block = sum(size for _, size, _ in estimate.block_terms(model_cfg, 0, _shape()))
  assert full.working - none.working == block - 4096
  assert none.kept == 2 * block


def test_dropless_expert_rows_are_the_static_receive_buffer():
  """With X 'expert' devices a dropless receiver reserves rows for every choice of its row: X·T·K."""
  moe_cfg = build.decoder_config(tiny(**{"moe.dispatcher": "dropless"}), VOCAB).moe
  tokens, k = 2 * 16, 2
  assert estimate.moe_rows(moe_cfg, _shape()) == (tokens * k, tokens * k)
  # 4 devices: 4·T·K rows in; back, the 'ragged' exchange of a GPU returns T·K rows, 'padded' (CPU) 4·T·K.
  assert estimate.moe_rows(moe_cfg, _shape(expert_devices=4)) == (4 * tokens * k, tokens * k)
  assert estimate.moe_rows(moe_cfg, _shape(expert_devices=4, platform="cpu")) == (4 * tokens * k, 4 * tokens * k)


def test_compiled_temp_falls_with_full_remat_under_scan():
  """XLA:CPU's temp: scanned blocks under remat 'full' free each step's buffers, so it falls.

  Unrolled, XLA:CPU's temp barely moves with the policy (experiments/remat_memory.py; README
  "Memory planner"), which is why the planner reports the analytic activations beside it.
  """
  temps = {}
  for policy in ("none", "full"):
    cfg = tiny(**{"mesh.data": 1, "model.remat": policy, "model.scan_layers": True})
    temps[policy] = plan_lib.make_plan(cfg, DEVICES["h100-80gb"]).compiled["temp"]
  assert temps["full"] < 0.8 * temps["none"], temps


# (arguments after --config, what the one line must say): refused before JAX starts, but the last.
BAD_INPUT = [
  (("--mesh", "data=8,tensor=2", "--device", "h100-80gb"), "'tensor' is not a mesh axis"),
  (("--mesh", "data=0", "--device", "h100-80gb"), "data=0 must be >= 1"),
  (("--mesh", "data=two", "--device", "h100-80gb"), "data='two' is not an integer"),
  (("--mesh", "data=2,data=2", "--device", "h100-80gb"), "data is given twice"),
  (("--device", "h100-80gb"), "--mesh is required"),
  (("--mesh", "data=2", "--device", "h100"), "--device: 'h100' is not known; choose one of a100-40gb"),
  (("--mesh", "data=2"), "--device is required"),
  (("--mesh", "data=2", "--device", "h100-80gb", "--config.moe.top_kk=2"), "unknown config field 'top_kk'"),
  (("--mesh", "data=1,expert=3", "--device", "h100-80gb"), "config mesh.expert"),  # 3 does not divide 8 experts.
]


def test_bad_input_is_one_line_and_exit_2():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # Run at once: no shared cache (tests/conftest.py).
  config = ("--config", "configs/quickstart.py")
  runs = [
    subprocess.Popen(
      [sys.executable, "-m", "moejax.plan", *config, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
    )
    for args, _ in BAD_INPUT
  ]  # fmt: skip
  for (args, expected), run in zip(BAD_INPUT, runs):
    out, err = run.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert run.returncode == 2, (args, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, err)
    assert out == ""


if __name__ == "__main__" and sys.argv[1:] == ["measure"]:
  _measure()
