"""Run a shell command in a lab VM over its serial console (root, no password in the lab).

Independent of the guest agent on purpose: tests and operators use it to check what the
guest really sees, and to kill or restart the agent itself. It logs in when needed and
wraps the command between unique markers to cut its output and exit status out of the
console stream.
"""

from __future__ import annotations

import os
import re
import select
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from symbiont.host.libvirt_host import LibvirtHost

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def read_lines(log: Path, offset: int) -> tuple[list[bytes], int]:
    """The whole lines (without their newline) a guest's console log gained after byte ``offset``,
    and the offset just after the last of them: a line still being written is read next time.

    The experiments poll the log QEMU appends the serial console to while the guest writes it.
    A log that is missing or unreadable gives no lines and keeps ``offset``; so does one that
    shrank below ``offset`` (until it grows past it again). Bytes, since console noise need not
    be UTF-8.
    """
    try:
        with log.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return [], offset
    cut = data.rfind(b"\n") + 1
    return data[:cut].split(b"\n")[:-1], offset + cut


class ConsoleError(Exception):
    """The console did not answer as expected."""


@dataclass
class ConsoleResult:
    rc: int
    output: str


def console_pty(host: LibvirtHost, name: str) -> str:
    root = ET.fromstring(host.domain(name).XMLDesc(0))
    for serial in root.iterfind("./devices/serial"):
        src = serial.find("source")
        if serial.get("type") == "pty" and src is not None and src.get("path"):
            return src.get("path")  # type: ignore[return-value]
    raise ConsoleError(f"{name}: no pty serial console")


class SerialConsole:
    def __init__(self, pty_path: str) -> None:
        self.fd = os.open(pty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.buf = b""

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> SerialConsole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, text: str) -> None:
        data = text.encode()
        while data:
            _, w, _ = select.select([], [self.fd], [], 5)
            if not w:
                raise ConsoleError("console not writable")
            data = data[os.write(self.fd, data) :]

    def read_until(self, pattern: bytes | re.Pattern[bytes], timeout: float) -> bytes:
        rx = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        deadline = time.monotonic() + timeout
        while True:
            clean = ANSI.sub(b"", self.buf)
            m = rx.search(clean)
            if m:
                self.buf = clean[m.end() :]
                return clean[: m.end()]
            left = deadline - time.monotonic()
            if left <= 0:
                tail = clean[-300:].decode(errors="replace")
                raise ConsoleError(f"timed out waiting for {rx.pattern!r}; console tail: {tail!r}")
            r, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if r:
                try:
                    self.buf += os.read(self.fd, 65536)
                except BlockingIOError:
                    pass

    def login(self, timeout: float = 60.0) -> None:
        """Get to a root shell prompt (logging in if the console shows a login prompt)."""
        deadline = time.monotonic() + timeout
        self.buf = b""
        while time.monotonic() < deadline:
            self.write("\r")
            try:
                got = self.read_until(rb"(login: |# |Password: )", timeout=3)
            except ConsoleError:
                continue
            if got.endswith(b"login: "):
                self.write("root\r")
                try:
                    got = self.read_until(rb"(# |Password: |Login incorrect)", timeout=15)
                except ConsoleError:
                    continue
            if got.endswith(b"Password: "):
                self.write("\r")
                continue
            if got.endswith(b"# "):
                # Quiet the console: no kernel messages, no echo of what we type.
                self.write("stty -echo; dmesg -n 1; export PS1='# '\r")
                time.sleep(0.3)
                self.buf = b""
                return
        raise ConsoleError("could not log in on the serial console")

    def run(self, command: str, timeout: float = 60.0) -> ConsoleResult:
        tag = uuid.uuid4().hex[:12]
        self.buf = b""
        self.write(f"echo B{tag}; ( {command} ) 2>&1; echo E{tag} $?\r")
        got = self.read_until(re.compile(rf"E{tag} (\d+)".encode()), timeout)
        m = re.search(rf"B{tag}\r?\n(.*)E{tag} (\d+)".encode(), got, re.S)
        if not m:
            raise ConsoleError(f"could not parse console output for {command!r}")
        return ConsoleResult(int(m.group(2)), m.group(1).decode(errors="replace").replace("\r", ""))


def guest_exec(host: LibvirtHost, name: str, command: str, timeout: float = 60.0) -> ConsoleResult:
    """Log in on ``name``'s serial console and run ``command``; return exit status and output."""
    with SerialConsole(console_pty(host, name)) as con:
        con.login()
        return con.run(command, timeout)
