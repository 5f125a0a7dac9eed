"""Parley: a terminal chat app for many persistent personas on a local MLX model."""

__version__ = "0.1.0"
