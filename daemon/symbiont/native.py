"""C code built at first use with the host's compiler and loaded with :mod:`ctypes`.

Shared by the page hash (``dedup/native.py``) and the NBD data path (``ssdcache/nbdfast.py``):
each is compiled once per process into a private temporary directory (mode 0700, removed once
the library is mapped: nothing another user could swap under a root daemon). Where it cannot be
built (no compiler, the switch in the environment set to 0, a compile error) :meth:`load`
returns ``None``, :meth:`why` says why, and the caller serves from its Python path.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class NativeLibrary(Generic[T]):
    """One C source built at most once; ``setup(cdll)`` declares its functions and returns what
    :meth:`load` hands out (the CDLL itself, or one function of it); ``unavailable`` is the log
    line (with one ``%s`` for the reason) when it cannot be built."""

    def __init__(self, name: str, source: str | Path, flags: Sequence[Sequence[str]], *, switch: str,
                 what: str, setup: Callable[[ctypes.CDLL], T], log: logging.Logger, unavailable: str,
                 level: int = logging.INFO, extra_args: Sequence[str] = (), timeout: float = 60) -> None:
        self.name, self.source, self.flags, self.switch = name, source, flags, switch
        self.what, self.setup, self.log, self.unavailable, self.level = what, setup, log, unavailable, level
        self.extra_args, self.timeout = tuple(extra_args), timeout
        self._lock = threading.Lock()
        self._loaded: T | None = None
        self._tried = False
        self._why = ""

    def _build(self) -> T | None:
        if os.environ.get(self.switch, "1") == "0":
            self._why = f"disabled by {self.switch}=0"
            return None
        if isinstance(self.source, Path) and not self.source.is_file():
            self._why = f"{self.source} is missing"
            return None
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if cc is None:
            self._why = "no C compiler (cc/gcc) on PATH"
            return None
        with tempfile.TemporaryDirectory(prefix=f"symbiont-{self.name}-") as d:
            lib = Path(d) / f"{self.name}.so"
            if isinstance(self.source, Path):
                src = self.source
            else:
                src = Path(d) / f"{self.name}.c"
                src.write_text(self.source)
            errors = []
            for flags in self.flags:
                res = subprocess.run([cc, *flags, "-shared", "-fPIC", *self.extra_args, "-o", str(lib), str(src)],
                                     capture_output=True, text=True, timeout=self.timeout)  # fmt: skip
                if res.returncode == 0:
                    break
                errors.append(f"{' '.join(flags)}: {res.stderr.strip()[-200:]}")
            else:
                self._why = f"compiling {self.what} failed: " + "; ".join(errors)
                return None
            so = ctypes.CDLL(str(lib))  # mapped now: the file can go with the directory
        out = self.setup(so)
        self._why = f"compiled with {cc} {' '.join(flags)}"
        return out

    def load(self) -> T | None:
        """The built library, once per process; ``None`` where it cannot be (see :meth:`why`)."""
        if self._tried:
            return self._loaded
        with self._lock:
            if not self._tried:
                try:
                    self._loaded = self._build()
                except (OSError, subprocess.SubprocessError) as exc:
                    self._why = f"building {self.what} failed: {exc}"
                    self._loaded = None
                if self._loaded is None:
                    self.log.log(self.level, self.unavailable, self._why)
                self._tried = True
        return self._loaded

    def why(self) -> str:
        """How the library was built, or why it was not."""
        self.load()
        return self._why
