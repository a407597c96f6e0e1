"""One torch call on the calling thread alone, leaving every other thread's count as it is.

torch's CPU kernels split their work with OpenMP (``at::parallel_for``), and whether they
do reads the calling thread's OpenMP thread count. ``torch.set_num_threads`` sets that
count and, besides, torch's process-wide default, which every thread adopts at its first
parallel operation: a thread starting one while the default is lowered keeps one thread
for good. So the count is set through the OpenMP runtime's own ``omp_set_num_threads``,
which sets it for the calling thread only, once that runtime has been found and seen to be
the one torch reads. Where it is not found (on Windows, or a build that hides it), torch's
process-wide setting is used, and the README says what that means.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import torch

_OPENMP_NAMES = ("libgomp", "libiomp", "libomp")
_UNRESOLVED = object()
# The OpenMP runtime torch reads, None where none was found. Resolving it twice at once, in
# two threads, is harmless (each probes its own count) and needs no lock, which a fork
# during the resolution would leave held in the child.
_runtime = _UNRESOLVED


def run_on_one_thread(call: Callable, *args, **kwargs) -> None:
    """``call(*args, **kwargs)`` with the calling thread's intra-op thread count at 1, and
    put back after, whatever the call raises."""
    threads = torch.get_num_threads()  # (also torch's first-use set-up of this thread)
    if threads == 1:
        call(*args, **kwargs)
        return
    runtime = _openmp_runtime()
    set_count = runtime.omp_set_num_threads if runtime is not None else torch.set_num_threads
    set_count(1)
    try:
        call(*args, **kwargs)
    finally:
        set_count(threads)


def _openmp_runtime():
    global _runtime
    if _runtime is _UNRESOLVED:
        _runtime = next(filter(_is_torchs, map(_load, _candidate_paths())), None)
    return _runtime


def _candidate_paths() -> list:
    """The OpenMP runtimes mapped into this process, torch's own first; then (None) the
    symbols the process exports globally."""
    mapped = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith(_OPENMP_NAMES):
                    mapped.append(fields[5].strip())
    except OSError:
        pass
    # (torch/lib/ in torch's wheels; torch.libs/ where auditwheel vendored it)
    torch_package = os.path.dirname(torch.__file__)
    mapped = sorted(set(mapped), key=lambda path: not path.startswith(torch_package))
    return [*mapped, None]


def _load(path):
    try:
        library = ctypes.CDLL(path)
        library.omp_set_num_threads.argtypes = [ctypes.c_int]
        library.omp_set_num_threads.restype = None
        library.omp_get_max_threads.restype = ctypes.c_int
        return library
    except (OSError, AttributeError, TypeError):
        return None


def _is_torchs(library) -> bool:
    """Does torch see what this runtime sets? Checked by setting this thread's count one
    below torch's (more than 1 here; one above could meet OMP_THREAD_LIMIT), reading it
    back through torch, and putting it back."""
    if library is None:
        return False
    threads = torch.get_num_threads()
    if threads < 2 or library.omp_get_max_threads() != threads:
        return False
    library.omp_set_num_threads(threads - 1)
    try:
        return torch.get_num_threads() == threads - 1
    finally:
        library.omp_set_num_threads(threads)
