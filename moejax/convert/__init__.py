"""Conversion between moejax and other codebases' configs and weights (`hf`: Hugging Face transformers)."""
