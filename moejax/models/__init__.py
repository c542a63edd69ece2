"""Models built from moejax layers."""
