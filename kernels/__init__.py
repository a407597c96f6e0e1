"""Triton device code for adam-triton, installed as ``adam_triton.kernels``.

Importing this package imports triton. With ``TRITON_INTERPRET=1`` set before that import,
the kernels run on CPU tensors through Triton's interpreter.
"""

if __name__ == "kernels":
    # Imported under the top-level name: a checkout's root is on sys.path and someone looked
    # for PyPI's unrelated ``kernels`` package (transformers imports it to read its version).
    # Define nothing and import nothing (no triton), so that it finds no usable package here.
    __all__: list = []
else:
    from .adam import NO_GRADIENT, SEGMENT_ALIGNMENT_BYTES, adam_chunked_update, block_size, is_interpreted

    __all__ = ["NO_GRADIENT", "SEGMENT_ALIGNMENT_BYTES", "adam_chunked_update", "block_size", "is_interpreted"]
