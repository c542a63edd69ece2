"""Expert parallelism: every mesh shape computes what one device does (issue #5).

Meshes (data, expert) on the 8 fake CPU devices: (8, 1), (2, 4), (1, 8), against (1, 1).
Tolerance: float32 sums over different groupings (psum over devices vs one sum), relative and
absolute 2e-5 for outputs, losses and gradients.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cli_util import REPO, TINY, run_cli, without_compilation_cache
from moejax.layers.moe import MoEConfig, MoELayer
from moejax.parallel import make_mesh
from moejax.metric_writer import read_metrics

MESHES = [(8, 1), (2, 4), (1, 8)]
TOL = dict(rtol=2e-5, atol=2e-5)

# Every router family and both data paths; capacity 1.0 so that the capacity paths drop tokens.
CASES = {
  "top2_sort": dict(router="top_k", top_k=2, dispatcher="sort"),
  "top1_einsum": dict(router="top_k", top_k=1, dispatcher="einsum"),
  "top2_dropless": dict(router="top_k", top_k=2, dispatcher="dropless", dropless_block_size=4),
  "expert_choice": dict(router="expert_choice", top_k=2, priority="choice_major"),
  "soft_moe": dict(router="soft_moe", slots_per_expert=2),
  "hash": dict(router="hash", top_k=1),
  "dense_gated": dict(router="dense"),
  "deepseek": dict(
    router="deepseek",
    top_k=2,
    score_function="sigmoid",
    combine_weights="renormalized",
    num_expert_groups=4,
    top_expert_groups=2,
    num_shared_experts=1,
    load_balance_scope="global_batch",
  ),
  # DeepSeek-V2's device-limited routing and its device / communication balance terms (in aux).
  "deepseek_v2": dict(
    router="deepseek",
    top_k=2,
    num_expert_groups=4,
    top_expert_groups=2,
    group_score="max",
    bias_update_rate=0.0,
    device_balance_loss_weight=0.05,
    comm_balance_loss_weight=0.02,
  ),
  # gpt-oss's experts: router and expert biases, clamped SwiGLU, on both data paths.
  "gpt_oss_dropless": dict(
    router="top_k", top_k=2, dispatcher="dropless", router_bias=True, expert_bias=True, activation="clamped_swiglu"
  ),
  "gpt_oss_sort": dict(router="top_k", top_k=2, router_bias=True, expert_bias=True, activation="clamped_swiglu"),
}


def _loss_and_grads(cfg: MoEConfig, mesh, x, ids):
  layer = MoELayer(8, cfg, mesh=mesh, rngs=nnx.Rngs(0))

  def loss_fn(layer, x):
    y, aux = layer(x, train=True, token_ids=ids)
    return jnp.sum(jnp.sin(y)) + aux["load_balance_loss"] + aux["z_loss"], (y, aux)

  (loss, (y, aux)), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(layer, x)
  return y, loss, aux, nnx.state(grads)


def _assert_same(got, want, label):
  """(output, loss, aux, grads) of a mesh equal one device's: same trees, leaves to TOL."""
  for name, a, b in zip(("output", "loss", "aux", "grads"), got, want):
    assert jax.tree.structure(a) == jax.tree.structure(b), f"{label} {name}"
    for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(leaf_a, leaf_b, **TOL, err_msg=f"{label} {name}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mesh_equals_one_device(case):
  cfg = MoEConfig(num_experts=8, d_expert=16, capacity_factor=1.0, **CASES[case])
  x = jax.random.normal(jax.random.key(0), (16, 8, 8))  # 16 groups of one sequence: 2 per device
  ids = jax.random.randint(jax.random.key(1), (16, 8), 0, 50)
  want = _loss_and_grads(cfg, make_mesh(1, 1), x, ids)
  assert np.abs(np.asarray(want[0])).max() > 0.1
  for data, expert in MESHES:
    _assert_same(_loss_and_grads(cfg, make_mesh(data, expert), x, ids), want, f"{case} mesh ({data}, {expert})")


def test_experts_live_on_their_devices():
  """Inside the layer each device holds E/n experts: the weights enter shard_map split on 'expert'."""
  cfg = MoEConfig(num_experts=8, top_k=2, d_expert=16)
  layer = MoELayer(8, cfg, mesh=make_mesh(2, 4), rngs=nnx.Rngs(0))
  text = jax.jit(lambda x: layer(x, train=False)[0]).lower(jnp.ones((8, 8, 8))).as_text()
  assert "all_to_all" in text or "all-to-all" in text
  # 8 experts over 4 devices: the local weights are [2, d, f].
  assert "tensor<2x8x16xf32>" in text


def test_state_sharding_splits_experts_and_optionally_the_rest():
  from moejax.parallel import expert_param, state_sharding

  # Expert weights are known by their sharding metadata (as MoELayer creates them), not by name.
  state = {
    "params": {
      "blocks": {
        0: {"ffn": {"wi": expert_param(jnp.zeros((8, 16, 32))), "wo": expert_param(jnp.zeros((8, 32, 16)))}},
        1: {"ffn": {"wi": nnx.Param(jnp.zeros((16, 64)))}},
      },
      "embed": jnp.zeros((50, 16)),
    },
    "step": jnp.zeros((), jnp.int32),
  }
  specs = lambda fsdp: jax.tree.map(lambda s: tuple(s.spec), state_sharding(make_mesh(2, 4), state, fsdp=fsdp))
  plain, fsdp = specs(False), specs(True)
  assert plain["params"]["blocks"][0]["ffn"]["wi"] == ("expert", None, None)
  assert plain["params"]["blocks"][1]["ffn"]["wi"] == (None, None)  # a dense FFN: replicated
  assert plain["params"]["embed"] == (None, None) and plain["step"] == ()
  # FSDP: each array also split over 'data' on its largest dimension that 2 divides.
  assert fsdp["params"]["blocks"][0]["ffn"]["wi"] == ("expert", None, "data")
  assert fsdp["params"]["blocks"][0]["ffn"]["wo"] == ("expert", "data", None)
  assert fsdp["params"]["blocks"][1]["ffn"]["wi"] == (None, "data")
  assert fsdp["params"]["embed"] == ("data", None) and fsdp["step"] == ()


def test_refuses_meshes_that_do_not_divide():
  x = jnp.ones((8, 8, 8))
  layer = MoELayer(8, MoEConfig(num_experts=6, d_expert=16), mesh=make_mesh(2, 4), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible by the mesh's 4 'expert' devices"):
    layer(x, train=False)
  layer = MoELayer(8, MoEConfig(num_experts=8, d_expert=16), mesh=make_mesh(8, 1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="must split evenly over the mesh's 8 data × expert devices"):
    layer(jnp.ones((4, 8, 8)), train=False)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
  """jax.lax.ragged_all_to_all's documented semantics from all_gather and gathers (XLA:CPU has none).

  Arguments the real collective requires to be consistent are checked: a violation turns the
  output into NaN, so that the comparison with one device fails.
  """
  me = jax.lax.axis_index(axis_name)
  everyone = [jax.lax.all_gather(a, axis_name) for a in (operand, input_offsets, send_sizes, output_offsets)]
  operands, starts, sizes, landings = everyone  # [n, M, ...] and [n senders, n receivers]
  # Documented: send_sizes == all_to_all(recv_sizes); slices in range and not overlapping.
  ok = jnp.all(send_sizes == jax.lax.all_to_all(recv_sizes, axis_name, 0, 0, tiled=True))
  ok &= jnp.all(recv_sizes == sizes[:, me])
  ok &= jnp.all(input_offsets + send_sizes <= operand.shape[0]) & jnp.all(input_offsets >= 0)
  ends = landings[:, me] + sizes[:, me]
  ok &= jnp.all(ends <= output.shape[0]) & jnp.all(landings[:, me] >= 0)
  order = jnp.argsort(landings[:, me])
  ok &= jnp.all(ends[order][:-1] <= landings[:, me][order][1:])  # received slices do not overlap
  r = jnp.arange(output.shape[0])
  lo = landings[:, me][:, None]
  hit = (r >= lo) & (r < lo + sizes[:, me][:, None])  # [n, R]: row r comes from sender i
  source = jnp.clip(starts[:, me][:, None] + r - lo, 0, operand.shape[0] - 1)
  rows = operands[jnp.arange(operands.shape[0])[:, None], source]  # [n, R, ...]
  for i in range(operands.shape[0]):
    output = jnp.where(hit[i].reshape(-1, *[1] * (output.ndim - 1)), rows[i], output)
  if jnp.issubdtype(output.dtype, jnp.floating):
    output = jnp.where(ok, output, jnp.nan)
  else:
    output = jnp.where(ok, output, -(10**6))  # an expert id no device has
  return output


@pytest.mark.parametrize("data,expert", [(2, 4), (1, 8)])
def test_ragged_exchange_equals_one_device(monkeypatch, data, expert):
  """Dropless over 'expert' with the ragged layout (sizes, offsets, the way back) == one device."""
  from moejax import parallel

  monkeypatch.setattr(parallel, "_ragged_all_to_all", _emulated_ragged_all_to_all)
  cfg = MoEConfig(num_experts=8, d_expert=16, expert_exchange="ragged", **CASES["top2_dropless"])
  x = jax.random.normal(jax.random.key(0), (16, 8, 8))
  want = _loss_and_grads(cfg, make_mesh(1, 1), x, None)
  _assert_same(_loss_and_grads(cfg, make_mesh(data, expert), x, None), want, f"mesh ({data}, {expert})")


def test_ragged_exchange_lowers_for_gpu():
  """The real collective, forward and backward, in the program XLA:GPU would compile (not run here)."""
  cfg = MoEConfig(num_experts=8, d_expert=16, expert_exchange="ragged", **CASES["top2_dropless"])
  layer = MoELayer(8, cfg, mesh=make_mesh(2, 4), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x, train=True)[0] ** 2)
  text = jax.jit(jax.grad(loss)).trace(state, jnp.ones((16, 8, 8))).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("ragged_all_to_all") >= 4  # tokens and ids there, outputs back; and the gradients


# --- End to end through the CLI: training, checkpoints across meshes, two processes ----------

STEPS = 12
# The tiny quickstart with 8 experts (so that 8 expert devices divide them), a constant
# learning rate (so that a run may be resumed with a longer horizon) and a checkpoint every 6 steps.
RUN = ("--config.moe.num_experts=8", "--config.optim.schedule=constant", "--config.train.checkpoint_every=6")
# Losses of one step on different meshes differ by float32 reduction order, and the differences
# grow a little over the steps: 12 steps agree to 2e-4 (relative).
LOSS_TOL = dict(rtol=2e-4, atol=0)


def _mesh_flags(data, expert):
  return (f"--config.mesh.data={data}", f"--config.mesh.expert={expert}")


def _losses(workdir):
  return np.asarray([row["loss"] for _, row in sorted(read_metrics(workdir).items())])


def _train(workdir, data_dir, *flags, devices=8, steps=STEPS):
  result = run_cli(
    workdir,
    *RUN,
    f"--config.train.num_steps={steps}",
    *flags,
    data_dir=data_dir,
    env={"JAX_NUM_CPU_DEVICES": str(devices)},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, data_dir):
  """The reference: STEPS steps on one device."""
  workdir = tmp_path_factory.mktemp("one_device") / "run"
  _train(workdir, data_dir, *_mesh_flags(1, 1), devices=1)
  return _losses(workdir)


# (8, 1) and (1, 8) are slow-marked: test_every_mesh_equals_one_device covers those meshes per step.
# (2, 2, 2) with FSDP: data, FSDP, expert and tensor parallelism at once (test_tensor_parallel.py
# covers 'model' meshes per step, for every router family and attention kind).
@pytest.mark.parametrize(
  "data,expert,model,fsdp",
  [
    pytest.param(8, 1, 1, False, marks=pytest.mark.slow),
    (2, 4, 1, False),
    pytest.param(1, 8, 1, False, marks=pytest.mark.slow),
    (4, 2, 1, True),
    (2, 2, 2, True),
  ],
)
def test_training_follows_the_one_device_losses(tmp_path, data_dir, one_device, data, expert, model, fsdp):
  flags = (*_mesh_flags(data, expert), f"--config.mesh.model={model}", f"--config.mesh.fsdp={fsdp}")
  result = _train(tmp_path / "run", data_dir, *flags)
  assert f"mesh: {{'data': {data}, 'expert': {expert}, 'model': {model}}} over 8 cpu device(s)" in result.stdout
  losses = _losses(tmp_path / "run")
  assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1
  np.testing.assert_allclose(losses, one_device, **LOSS_TOL)


def test_checkpoints_restore_across_meshes(tmp_path, data_dir, one_device):
  """Save on 1 device, resume on 8 (1×8): the one-device trajectory. (8 -> 1: the two-process test.)"""
  workdir = tmp_path / "run"
  _train(workdir, data_dir, *_mesh_flags(1, 1), devices=1, steps=6)
  result = _train(workdir, data_dir, *_mesh_flags(1, 8), steps=STEPS)
  assert "resumed from the checkpoint at step 6" in result.stdout
  np.testing.assert_allclose(_losses(workdir), one_device, **LOSS_TOL)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _workers(workdir, data_dir, *flags, devices=4, n=2):
  """n CLI processes of one job over 127.0.0.1, each with `devices` CPU devices."""
  args = [
    sys.executable,
    "-m",
    "moejax.main",
    "--config",
    "configs/quickstart.py",
    "--workdir",
    str(workdir),
    f"--config.data.data_dir={data_dir}",
    *TINY,
    *RUN,
    *flags,
    f"--config.distributed.coordinator_address=127.0.0.1:{_free_port()}",
    f"--config.distributed.num_processes={n}",
  ]
  env = without_compilation_cache({**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)})
  return [
    subprocess.Popen(
      args + [f"--config.distributed.process_id={i}"],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(n)
  ]


def _finish(workers, timeout=240):
  """[(returncode, stdout, stderr)] of each worker; kills them all on a timeout."""
  try:
    outputs = [w.communicate(timeout=timeout) for w in workers]
  finally:
    for w in workers:
      w.kill()
  return [(w.returncode, out, err) for w, (out, err) in zip(workers, outputs)]


def test_two_processes_match_one_process(tmp_path, data_dir, one_device):
  """2 processes × 4 CPU devices over 127.0.0.1, mesh 2×4, then resumed in one process on 1 device."""
  workdir, data_dir = tmp_path / "run", str(tmp_path / "tfds")  # Fresh data: process 0 prepares it.
  results = _finish(_workers(workdir, data_dir, "--config.train.num_steps=6", *_mesh_flags(2, 4)))
  for code, _, err in results:
    assert code == 0, err[-3000:]
  (_, out0, _), (_, out1, _) = results
  assert "over 8 cpu device(s), 2 process(es)" in out0
  # Only process 0 prints (the gloo collectives library logs its connections on both).
  assert "mesh:" in out0 and "done in" in out0
  assert not any(word in out1 for word in ("mesh:", "model:", "eval", "done in", "preparing"))
  assert "preparing" in out0  # Process 0 alone wrote the dataset files.
  np.testing.assert_allclose(_losses(workdir), one_device[:6], **LOSS_TOL)
  # The two processes' checkpoint restores in one process on one device.
  result = _train(workdir, data_dir, *_mesh_flags(1, 1), devices=1, steps=STEPS)
  assert "resumed from the checkpoint at step 6" in result.stdout
  np.testing.assert_allclose(_losses(workdir), one_device, **LOSS_TOL)


def test_two_processes_refuse_bad_input_together(tmp_path):
  """Each process stops with one line and exit 2: no traceback, no hang."""
  # A mesh that leaves process 1's device out.
  for code, _, err in _finish(_workers(tmp_path / "a", tmp_path / "d", *_mesh_flags(1, 1), devices=1)):
    assert code == 2 and "error: config mesh.data: with 2 processes the mesh must use all 2 devices" in err, err
    assert "Traceback" not in err
  # Process 0 cannot prepare the dataset (its data dir is a file): it says why, process 1 says so.
  (tmp_path / "file").write_text("")
  (code0, _, err0), (code1, _, err1) = _finish(_workers(tmp_path / "b", tmp_path / "file" / "d", devices=1))
  assert code0 == 2 and code1 == 2, (err0[-2000:], err1[-2000:])
  assert "error: " in err0 and "Traceback" not in err0
  assert "error: process 0 could not prepare the dataset" in err1
  assert not (tmp_path / "b").exists()


def test_signal_on_one_process_stops_both_at_one_step(tmp_path, data_dir):
  workdir = tmp_path / "run"
  workers = _workers(
    workdir, data_dir, "--config.train.num_steps=100000", "--config.train.checkpoint_every=1000", *_mesh_flags(2, 4)
  )
  deadline = time.time() + 180
  while time.time() < deadline and not ((workdir / "metrics.jsonl").exists() and len(read_metrics(workdir)) >= 3):
    time.sleep(0.2)
  workers[1].send_signal(signal.SIGTERM)
  (code0, out0, err0), (code1, _, err1) = _finish(workers)
  assert code0 == 0 and code1 == 0, (err0[-2000:], err1[-2000:])
  assert "a signal (on another process) received: saved a checkpoint at step" in out0
  saved = int(out0.split("saved a checkpoint at step ")[1].split(";")[0])
  assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == [saved]
