"""Command line of the memory planner (design: `moejax.plan`).

  python -m moejax.plan --config configs/architectures.py:mixtral_8x7b --mesh data=8,expert=8,model=1 \\
      --device h100-80gb [--config.train.microbatches=8 ...] [--json plan.json]

--mesh sets mesh.data, mesh.expert and mesh.model (an axis left out is 1) and how many fake CPU
devices JAX starts with; it is read, and refused if bad, before JAX starts. Bad input (--mesh,
--device, the config or an override) is one line on stderr and exit code 2. The flags live in a
FlagValues of their own, so that moejax.main's one-line refusals of config errors can be reused.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from moejax.plan import DEVICES, MESH_AXES

EXIT_BAD_INPUT = 2
_FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py[:arg]).", flag_values=_FLAGS, lock_config=True
)
flags.DEFINE_string("mesh", None, "data=D,expert=X,model=M (axes left out: 1); overrides mesh.*.", flag_values=_FLAGS)
flags.DEFINE_string("device", None, f"One of {', '.join(DEVICES)}.", flag_values=_FLAGS)
flags.DEFINE_string("json", None, "Also write the plan's numbers (bytes per device) to this file.", flag_values=_FLAGS)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def parse_mesh(text: str | None) -> dict[str, int]:
  """{'data': D, 'expert': X, 'model': M} from 'data=D,expert=X,model=M'; ValueError (one line) if bad."""
  usage = "use data=D,expert=X,model=M with positive integers (e.g. data=8,expert=8,model=1)"
  if not text:
    raise ValueError(f"--mesh is required; {usage}")
  mesh = dict.fromkeys(MESH_AXES, 1)
  seen = set()
  for part in text.split(","):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in MESH_AXES:
      raise ValueError(f"--mesh: {name!r} is not a mesh axis (axes: {', '.join(MESH_AXES)}); {usage}")
    if name in seen:
      raise ValueError(f"--mesh: {name} is given twice; {usage}")
    seen.add(name)
    try:
      size = int(value)
    except ValueError:
      raise ValueError(f"--mesh: {name}={value!r} is not an integer; {usage}") from None
    if size < 1:
      raise ValueError(f"--mesh: {name}={size} must be >= 1; {usage}")
    mesh[name] = size
  return mesh


def _parse(argv: list[str]):
  """(config, mesh, device, json path), or one line on stderr and exit 2."""
  from moejax.main import _config_path, _one_line

  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    _fail(f"--config: no such config file {path!r}")
  try:
    rest = _FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - config_flags raises the config file's own errors here too.
    _fail(_one_line(e))
  if len(rest) > 1:
    _fail(f"unexpected arguments {rest[1:]}; use --config, --mesh, --device and --json")
  if _CONFIG.value is None:
    _fail("--config is required (e.g. --config configs/architectures.py:mixtral_8x7b)")
  try:
    mesh = parse_mesh(_FLAGS.mesh)
  except ValueError as e:
    _fail(str(e))
  if _FLAGS.device not in DEVICES:
    given = "--device is required" if not _FLAGS.device else f"--device: {_FLAGS.device!r} is not known"
    _fail(f"{given}; choose one of {', '.join(DEVICES)}")
  return _CONFIG.value, mesh, DEVICES[_FLAGS.device], _FLAGS.json


def main(argv: list[str] | None = None) -> int:
  cfg, mesh, device, json_path = _parse(sys.argv if argv is None else argv)
  import jax  # Only now: the device count must be set before JAX starts its backend.

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", mesh["data"] * mesh["expert"] * mesh["model"])
  from moejax import plan
  from moejax.errors import ConfigError
  from moejax.plan import report

  cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model = mesh["data"], mesh["expert"], mesh["model"]
  try:
    result = plan.make_plan(cfg, device, config_name=_config_arg(sys.argv if argv is None else argv)).to_json()
  except ConfigError as e:
    _fail(f"config {e}")
  print(report.table(result))
  if json_path:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
      json.dump(result, f, indent=1)
  return 0


def _config_arg(argv: list[str]) -> str:
  """What --config was given (file[:arg]), for the report's first line."""
  for i, arg in enumerate(argv):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
  return ""


if __name__ == "__main__":
  sys.exit(main())
