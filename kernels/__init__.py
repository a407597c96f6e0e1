"""Triton device code for adam-triton, installed as ``adam_triton.kernels``.

Importing this package imports triton. With ``TRITON_INTERPRET=1`` set before that import,
the kernels run on CPU tensors through Triton's interpreter.
"""

from .adam import NO_GRADIENT, SEGMENT_ALIGNMENT_BYTES, adam_chunked_update, block_size, is_interpreted

__all__ = ["NO_GRADIENT", "SEGMENT_ALIGNMENT_BYTES", "adam_chunked_update", "block_size", "is_interpreted"]
