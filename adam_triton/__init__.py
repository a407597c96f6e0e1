"""adam-triton: torch.optim.Adam and AdamW as one fused Triton update over flat buffers.

    from adam_triton import Adam, AdamW   # instead of torch.optim.Adam / AdamW
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    """Finds ``adam_triton.kernels`` in a source checkout.

    The Triton code lives in the top-level ``kernels/`` directory; setup.py installs it as
    ``adam_triton.kernels`` (``package_dir``), and editable installs map it the same way. Run
    straight from a source tree, nothing maps it, or an editable install of another tree
    maps it there; this finder, first in line, takes the one beside this adam_triton.
    """

    def __init__(self, directory: Path):
        self.directory = directory

    def find_spec(self, name, path=None, target=None):
        if name != "adam_triton.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, self.directory / "__init__.py", submodule_search_locations=[str(self.directory)]
        )


def _map_source_tree_kernels() -> None:
    here = Path(__file__).resolve().parent
    beside = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (beside / "_adam_kernel.py").is_file():
        return
    if not any(isinstance(finder, _SourceTreeKernels) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourceTreeKernels(beside))


_map_source_tree_kernels()

from . import functional  # noqa: E402
from .optimizer import Adam, AdamW  # noqa: E402

__all__ = ["Adam", "AdamW", "functional", "__version__"]
