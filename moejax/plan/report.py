"""The memory plan as a table for a terminal (GiB per device), from `moejax.plan.Plan.to_json()`."""

from __future__ import annotations

MiB, GiB = 2**20, 2**30
COPIES = {  # `moejax.plan.estimate`'s copies, by kind.
  "low_precision": "param_dtype: bfloat16 copy",
  "fsdp_gathered": "FSDP: a block gathered",
  "scan_stacked": "scan_layers: blocks stacked",
}


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def table(plan: dict) -> str:
  """The plan's lines: the setup, then per device the analytic and the compiled bytes, then the verdict.

  In GiB, or MiB when both peaks are under 1 GiB.
  """
  s, mesh, a, c, st = plan["setup"], plan["mesh"], plan["analytic"], plan["compiled"], plan["state"]
  unit, size = ("GiB", GiB) if max(a["peak"], c["peak"]) >= GiB else ("MiB", MiB)
  _gib = lambda n: f"{n / size:9.2f}"
  devices = mesh["data"] * mesh["expert"] * mesh["model"]
  copies = sum(v for k, v in a.items() if k.startswith("copies_"))
  lines = [
    (
      f"memory plan: {plan['config'] or 'config'} on {devices} × {plan['device']} "
      f"(data {mesh['data']} × expert {mesh['expert']} × model {mesh['model']}{', fsdp' if s['fsdp'] else ''})"
    ),
    f"  {_count(s['total_params'])} parameters; batch {s['batch_size']} × {s['seq_len']} tokens in "
    f"{s['microbatches']} micro-batch(es): {s['sequences_per_device_microbatch']:g} sequence(s) per device per "
    f"micro-batch; remat {s['remat']}, scan_layers {'on' if s['scan_layers'] else 'off'}, "
    f"param_dtype {s['param_dtype']}, activations {s['dtype']}, {s['dispatcher']} dispatch"
    + (f" ({s['expert_rows_per_device']:,.0f} expert rows per device)" if s["expert_rows_per_device"] else ""),
    "",
    f"  {unit + ' per device':34s}{'analytic':>10s}{'compiled':>10s}",
    f"  {'parameters':34s}{_gib(st['params'])} {_gib(st['params'])}",
    f"  {'optimizer state':34s}{_gib(st['opt_state'])} {_gib(st['opt_state'])}",
    f"  {'other state + batch':34s}{_gib(st['other_state'] + st['batch'])} {_gib(st['other_state'] + st['batch'])}",
    f"  {'gradients (float32)':34s}{_gib(a['gradients'])} {'':>9s}",
    f"  {'parameter copies':34s}{_gib(copies)} {'':>9s}",
    *(f"  {'  ' + COPIES[k[7:]]:34s}{_gib(v)}" for k, v in a.items() if k.startswith("copies_") and v),
    (
      f"  {'activations (remat ' + s['remat'] + ')':34s}{_gib(a['activations'])} {_gib(c['activations_derived'])}"
      "  (compiled: temp - analytic gradients - copies)"
    ),
    f"  {'  kept for the backward pass':34s}{_gib(a['activations_kept'])}",
    f"  {'  one block backward + logits':34s}{_gib(a['activations_working'])}",
    f"  {'XLA temp':34s}{'':>9s} {_gib(c['temp'])}  (XLA:CPU's buffer assignment, not a GPU's/TPU's)",
    f"  {'peak':34s}{_gib(a['peak'])} {_gib(c['peak'])}",
    "",
    (
      f"  {plan['device']}: {plan['device_bytes'] / GiB:.1f} GiB, usable {plan['usable_bytes'] / GiB:.1f} GiB "
      f"({plan['usable_bytes'] / plan['device_bytes']:.0%})"
    ),
    (
      f"  fits: {plan['fits']['verdict']} (analytic {'fits' if plan['fits']['analytic'] else 'does not fit'}, "
      f"XLA:CPU {'fits' if plan['fits']['compiled'] else 'does not fit'}); compiled in {plan['compile_seconds']:.0f} s"
    ),
  ]
  if not s["state_matches_xla_arguments"]:
    lines.append(
      f"  note: the state and batch ({sum(st.values()):,} bytes) differ from XLA's arguments ({c['argument']:,} bytes)"
    )
  return "\n".join(lines)
