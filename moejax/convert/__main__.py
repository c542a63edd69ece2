"""Command line: Hugging Face model directories <-> moejax weights checkpoints.

  python -m moejax.convert from-hf --hf_dir DIR --out DIR [--preset NAME] [--without_mtp]
  python -m moejax.convert to-hf --checkpoint DIR --out DIR [--step N] [--dtype bfloat16|float32]
                                 [--max_shard_size 5GB] [--hf_config FILE]

from-hf reads config.json and the safetensors (one file or shards with their index) of every
architecture moejax has a parity-tested preset for, and writes the moejax config and an orbax
checkpoint of the weights (`moejax.convert.checkpoints`); `--preset` checks that the model is
that preset of configs/architectures.py (otherwise one is looked for). to-hf writes a converted
model, a run's workdir or one step of a run back as safetensors shards, their index and
config.json, which transformers loads. Both stream one decoder layer at a time.

Bad input (a config.json key moejax does not model, a preset that is not this model, a missing,
unexpected or misshapen tensor, an unsupported dtype or architecture, a corrupt file, an --out
that exists) is one line on stderr naming it, exit status 2; --out is written only when the
conversion succeeded (it is built in <out>.partial and renamed).
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line, exit 2 (argparse prints its usage otherwise).
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m moejax.convert", description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  from_hf = commands.add_parser("from-hf", help="a Hugging Face model directory -> a moejax checkpoint")
  from_hf.add_argument("--hf_dir", required=True, help="directory with config.json and *.safetensors")
  from_hf.add_argument("--out", required=True, help="new directory for config.json and checkpoint/")
  from_hf.add_argument("--preset", help="a preset of configs/architectures.py the model must be")
  from_hf.add_argument(
    "--without_mtp", action="store_true", help="the main model only, without DeepSeek-V3's multi-token prediction"
  )
  to_hf = commands.add_parser("to-hf", help="a moejax checkpoint -> a Hugging Face model directory")
  to_hf.add_argument("--checkpoint", required=True, help="a converted model, a run's workdir or one step of a run")
  to_hf.add_argument("--out", required=True, help="new directory for config.json and *.safetensors")
  to_hf.add_argument("--step", type=int, help="which checkpoint of a run's workdir (default: the newest)")
  to_hf.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast the weights (default: as stored)")
  to_hf.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")
  to_hf.add_argument(
    "--hf_config",
    help="the config.json to write (default: the converted model's, else one written from the moejax config)",
  )
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from absl import logging

  logging.set_verbosity(logging.ERROR)  # orbax's INFO/WARNING lines (a v1 checkpoint read by the v0 reader).
  from moejax.convert import checkpoints, files
  from moejax.errors import ConfigError, silence_stderr

  parent = os.path.dirname(os.path.abspath(args.out)) if args.out.strip() else ""
  if not args.out.strip():
    problem = "must name a new directory"
  elif os.path.exists(args.out):
    problem = f"{args.out!r} exists; give a new directory (nothing is overwritten)"
  elif not os.path.isdir(parent):
    problem = f"the directory {parent!r} that would hold it does not exist"
  elif not os.access(parent, os.W_OK):
    problem = f"the directory {parent!r} is not writable"
  else:
    problem = None
  if problem:
    print(f"error: --out: {problem}", file=sys.stderr)
    return EXIT_BAD_INPUT
  try:
    if args.command == "from-hf":
      report = checkpoints.from_hf(args.hf_dir, args.out, preset=args.preset, without_mtp=args.without_mtp)
      print(f"wrote {args.out}: {report['parts_written']} parts, weights by dtype {report['elements_by_dtype']}")
    else:
      max_shard = files.parse_size(args.max_shard_size)
      report = checkpoints.to_hf(
        args.checkpoint,
        args.out,
        step=args.step,
        dtype=args.dtype,
        max_shard_bytes=max_shard,
        hf_config_path=args.hf_config,
      )
      print(f"wrote {args.out}: {report['tensors']} tensors in {', '.join(report['files'])}")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    silence_stderr()  # The one line stays the only one.
    return EXIT_BAD_INPUT
  except OSError as e:  # The disk, not the input: full, or a path that went away while writing.
    print(f"error: writing {args.out}: {e}", file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
