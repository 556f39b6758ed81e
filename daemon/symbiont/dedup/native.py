"""The page hash as a compiled loop: one pass over the pages, no temporaries.

numpy evaluates ``xsm64`` in three passes (shift, xor, then an integer ``dot`` that numpy runs as
a scalar multiply-add loop), which tops out at about 0.45x a memcpy of the same buffer on one
core. The same formula as a C loop, compiled for this CPU, reads each word once and lets the
compiler vectorise the 64-bit multiply (AVX-512DQ ``vpmullq`` where the CPU has it): 2-2.5x
memcpy on the test host (``benchmarks/bench_dedup.py`` prints both kernels against memcpy).

The kernel is built at first use with the host's C compiler (``cc``, which ``scripts/bootstrap.sh``
installs), into a private temporary directory (mode 0700, removed once loaded: nothing another
user could swap under a root daemon), and loaded with :mod:`ctypes`; ctypes releases the GIL
for the call, so hashing never holds up the daemon's other threads. Arithmetic is unsigned and
wraps modulo 2**64 exactly as numpy's does, so the result is bit for bit :func:`xsm64_numpy`'s
(``tests/unit/test_dedup_backends.py`` checks it). Without a compiler, or with
``SYMBIONT_NATIVE_HASH=0``, :func:`load` returns ``None`` and the numpy kernel is used.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

import numpy as np

from symbiont.native import NativeLibrary

log = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* h(page) = sum_i (w[i] ^ (w[i] >> shift)) * keys[i]  mod 2**64, for npages pages of nwords words. */
void symbiont_xsm64(const unsigned char *pages, size_t npages, size_t nwords, unsigned shift,
                    const uint64_t *keys, uint64_t *out)
{
    for (size_t p = 0; p < npages; p++) {
        const unsigned char *pg = pages + p * nwords * 8;
        uint64_t h = 0;
        for (size_t i = 0; i < nwords; i++) {
            uint64_t x;
            memcpy(&x, pg + 8 * i, 8);  /* no alignment assumed; compiles to a plain load */
            h += (x ^ (x >> shift)) * keys[i];
        }
        out[p] = h;
    }
}
"""

# Tried in order: this CPU's vector units first, then a portable build.
FLAGS = (["-O3", "-march=native"], ["-O3"])

def _setup(so: ctypes.CDLL) -> Callable[..., None]:
    fn = so.symbiont_xsm64
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint,
                   ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
    return fn


LIB: NativeLibrary[Callable[..., None]] = NativeLibrary(
    "xsm64", SOURCE, FLAGS, switch="SYMBIONT_NATIVE_HASH", what="the kernel", setup=_setup, log=log,
    unavailable="dedup: native page hash unavailable (%s); using numpy",
)
load = LIB.load  # the compiled kernel, built once per process; None where it cannot be (see why)
why = LIB.why  # how the kernel was built, or why it was not


def xsm64_native(words: np.ndarray, keys: np.ndarray, shift: int, out: np.ndarray) -> bool:
    """Hash C-contiguous ``(n, nwords)`` uint64 ``words`` into ``out``; ``False`` if no kernel."""
    fn = load()
    if fn is None:
        return False
    assert words.flags.c_contiguous and keys.flags.c_contiguous and out.flags.c_contiguous
    assert words.dtype == keys.dtype == out.dtype == np.uint64 and words.shape[1] == keys.shape[0]
    fn(words.ctypes.data, words.shape[0], words.shape[1], shift, keys.ctypes.data, out.ctypes.data)
    return True
