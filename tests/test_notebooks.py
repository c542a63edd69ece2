"""The notebooks of notebooks/ execute headlessly at a small size, so none can rot.

Each notebook has a cell tagged 'parameters'; a cell inserted after it sets the small size (as
papermill does). A notebook fails the test if any cell raises, and the notebooks check their own
numbers against independent references (the published parameter counts, einsum vs sort
dispatch, the routing stories of the hand-made logits).
"""

import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _execute(name: str, parameters: dict, env: dict | None = None) -> nbformat.NotebookNode:
  nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items())))
  for cell in nb.cells:  # Start from a clean notebook whatever the committed outputs are.
    if cell.cell_type == "code":
      cell.outputs = []
  # The kernel inherits this process's environment: no fake devices (one CPU device), as a user has.
  old = {k: os.environ.get(k) for k in (env or {})}
  os.environ.update(env or {})
  try:
    NotebookClient(
      nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}
    ).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      if output.get("output_type") == "stream":
        out.append(output["text"])
      elif "text/markdown" in output.get("data", {}):
        out.append(output["data"]["text/markdown"])
  return "\n".join(out)


def _images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for cell in nb.cells for o in cell.get("outputs", []))


def test_routing_explorer():
  nb = _execute("routing_explorer.ipynb", {"NUM_RANDOM_TOKENS": 1024})
  text = _text(nb)
  assert "token 2: e0: DROPPED" in text  # Switch, token-major: expert 0 is full after tokens 0 and 1.
  assert "expert 1 holds tokens [0, 1, 2, 6]" in text  # choice-major seats token 6's first choice.
  assert "einsum and sort dispatch agree" in text
  assert _images(nb) >= 6


def test_parameter_calculator():
  presets = ["olmoe_1b_7b", "gpt_oss_20b"]  # gpt-oss: expert biases, an active count without the embedding.
  nb = _execute("parameter_calculator.ipynb", {"PRESET_NAMES": presets, "WHAT_IF_PRESET": "olmoe_1b_7b"})
  text = _text(nb)
  # As tests/test_presets.py counts: counted, then as published / published.
  assert "| olmoe_1b_7b | 6.92B | 6.92B / 6.9B | 1.28B | 1.28B / 1.3B |" in text
  assert "| gpt_oss_20b | 20.91B | 20.91B / 20.91B | 4.19B | 3.61B / 3.61B |" in text
  assert "| gpt_oss_20b | 1.16B / 1.16B | 0.64B / 0.64B | 19.12B / 2.39B |" in text  # its biases among the experts
  assert "fine-grained" in text and _images(nb) >= 2


def test_results_explorer(tmp_path):
  # The committed quick results of routing_families; part 4 trains its runs for 3 steps here.
  nb = _execute(
    "results_explorer.ipynb",
    {"TRAIN_STEPS": 3, "NUM_SEQUENCES": 16, "SCRATCH": str(tmp_path / "scratch"), "GENERATE_TOKENS": 8},
    env={"MOEJAX_DATA_DIR": str(tmp_path / "tfds")},
  )
  text = _text(nb)
  assert "| switch_top1 |" in text  # the experiment's own table
  assert "I(source; expert)" in text and "I(character class; expert)" in text
  assert "same experts when decoded as in the full forward pass: True" in text  # part 5: generation
  assert (tmp_path / "scratch").is_dir()
  assert _images(nb) >= 6
