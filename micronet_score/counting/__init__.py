"""The counting interpreter and its Python API (see :mod:`micronet_score.counting.api`)."""

from micronet_score.counting.api import Counter, count, count_shapes

__all__ = ["Counter", "count", "count_shapes"]
