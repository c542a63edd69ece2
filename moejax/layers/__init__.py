"""Flax NNX layers: attention, feed-forward, MoE."""
