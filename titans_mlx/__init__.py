"""Titans (Learning to Memorize at Test Time) on Apple MLX."""

__version__ = "0.1.0"
