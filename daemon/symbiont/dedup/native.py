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
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

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

_lock = threading.Lock()
_loaded: Callable[..., None] | None = None
_tried = False
_why = ""


def _build() -> Callable[..., None] | None:
    global _why
    if os.environ.get("SYMBIONT_NATIVE_HASH", "1") == "0":
        _why = "disabled by SYMBIONT_NATIVE_HASH=0"
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        _why = "no C compiler (cc/gcc) on PATH"
        return None
    with tempfile.TemporaryDirectory(prefix="symbiont-xsm64-") as d:
        src, lib = Path(d) / "xsm64.c", Path(d) / "xsm64.so"
        src.write_text(SOURCE)
        errors = []
        for flags in FLAGS:
            res = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(lib), str(src)],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
            if res.returncode == 0:
                break
            errors.append(f"{' '.join(flags)}: {res.stderr.strip()[-200:]}")
        else:
            _why = "compiling the kernel failed: " + "; ".join(errors)
            return None
        so = ctypes.CDLL(str(lib))  # mapped now: the file can go with the directory
    fn = so.symbiont_xsm64
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint,
                   ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
    _why = f"compiled with {cc} {' '.join(flags)}"
    return fn


def load() -> Callable[..., None] | None:
    """The compiled kernel, built once per process; ``None`` where it cannot be (see :func:`why`)."""
    global _loaded, _tried
    if _tried:
        return _loaded
    with _lock:
        if not _tried:
            try:
                _loaded = _build()
            except (OSError, subprocess.SubprocessError) as exc:
                global _why
                _why = f"building the kernel failed: {exc}"
                _loaded = None
            if _loaded is None:
                log.info("dedup: native page hash unavailable (%s); using numpy", _why)
            _tried = True
    return _loaded


def why() -> str:
    """How the kernel was built, or why it was not."""
    load()
    return _why


def xsm64_native(words: np.ndarray, keys: np.ndarray, shift: int, out: np.ndarray) -> bool:
    """Hash C-contiguous ``(n, nwords)`` uint64 ``words`` into ``out``; ``False`` if no kernel."""
    fn = load()
    if fn is None:
        return False
    assert words.flags.c_contiguous and keys.flags.c_contiguous and out.flags.c_contiguous
    assert words.dtype == keys.dtype == out.dtype == np.uint64 and words.shape[1] == keys.shape[0]
    fn(words.ctypes.data, words.shape[0], words.shape[1], shift, keys.ctypes.data, out.ctypes.data)
    return True
