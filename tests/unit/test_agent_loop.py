"""The agent's serve loop on a pty standing in for the virtio-serial port (issue 15 item 4):
an idle agent sleeps in poll until the host writes (no timer of its own wakes the guest),
still answers requests, and a stop signal's wake-up fd ends it at once."""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from collections.abc import Iterator

import pytest

from symbiont_agent import agent
from symbiont_agent import protocol as proto


@pytest.fixture
def port() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)  # a binary channel: no line discipline
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def read_frames(fd: int, want: int, timeout: float = 5.0) -> list[proto.Message]:
    reader, got = proto.FrameReader(), []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            got.extend(reader.feed(os.read(fd, 65536)))
    return got


def test_idle_agent_blocks_until_the_host_writes_and_stops_on_its_wake_fd(
        port: tuple[int, str], monkeypatch: pytest.MonkeyPatch) -> None:
    master, path = port
    returns: list[float] = []
    real_poll = select.poll

    class CountingPoll:
        def __init__(self) -> None:
            self.p = real_poll()

        def register(self, *a: int) -> None:
            self.p.register(*a)

        def poll(self, timeout: int | None = None) -> list[tuple[int, int]]:
            ev = self.p.poll(timeout)
            returns.append(time.monotonic())
            return ev

    monkeypatch.setattr(agent.select, "poll", CountingPoll)
    r, w = os.pipe()
    stopping = threading.Event()
    t = threading.Thread(target=agent.serve, args=(agent.Channel(path),),
                         kwargs={"stop": stopping.is_set, "wake_fd": r}, daemon=True)
    t.start()
    try:
        hello = read_frames(master, 1)
        assert hello and hello[0].type == "hello" and hello[0].header["role"] == "agent"
        time.sleep(2.5)  # idle: the old loop woke every second
        assert returns == []
        os.write(master, proto.encode(proto.request(7, "ping", {"echo": "x"})))
        reply = read_frames(master, 1)
        assert reply and reply[0].header["id"] == 7 and reply[0].header["result"]["echo"] == "x"
        assert len(returns) >= 1
        stopping.set()
        t0 = time.monotonic()
        os.write(w, b"\x0f")  # what signal.set_wakeup_fd writes on SIGTERM
        t.join(2.0)
        assert not t.is_alive() and time.monotonic() - t0 < 1.0
    finally:
        stopping.set()
        os.write(w, b"x")
        t.join(3.0)
        os.close(r)
        os.close(w)


def test_without_a_wake_fd_the_loop_still_sees_stop_within_a_second(port: tuple[int, str]) -> None:
    master, path = port
    stopping = threading.Event()
    t = threading.Thread(target=agent.serve, args=(agent.Channel(path),), kwargs={"stop": stopping.is_set},
                         daemon=True)
    t.start()
    assert read_frames(master, 1)
    stopping.set()
    t.join(2.0)
    assert not t.is_alive()
