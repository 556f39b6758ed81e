"""AgentLink survives whatever a session throws: it drops that connection and reconnects,
never dying silently while the API says "connected" (issue 16 item 6)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from symbiont.agentlink import AgentLink
from symbiont_agent import protocol as proto


def test_an_unexpected_exception_drops_the_connection_and_the_link_reconnects(tmp_path: Path) -> None:
    async def run() -> None:
        path = str(tmp_path / "chan.sock")
        sessions: list[asyncio.StreamWriter] = []

        async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sessions.append(writer)
            writer.write(proto.encode(proto.hello("agent", "t", ["stats"], boot_id="b", pid=len(sessions))))
            if len(sessions) == 1:
                writer.write(proto.encode(proto.event("boom", {})))  # its handler raises
            await writer.drain()
            await reader.read()  # until the link closes it

        server = await asyncio.start_unix_server(agent, path)
        link = AgentLink("vm", lambda: path, reconnect_max=0.2)

        def boom(data: dict, payload: bytes) -> None:
            raise RuntimeError("a bug in a stream handler")

        link.stream_handlers["boom"] = boom
        link.start()
        try:
            async with asyncio.timeout(10):
                while len(sessions) < 2 or not link.ready:
                    await asyncio.sleep(0.05)
            assert link._task is not None and not link._task.done()
            assert "RuntimeError" in link.stats.history[0] and link.stats.connects == 2
            assert link.hello is not None and link.hello["pid"] == 2
        finally:
            await link.stop()
            server.close()

    asyncio.run(run())


def test_stop_is_bounded_even_when_the_task_will_not_end(tmp_path: Path) -> None:
    """Daemon.unregister holds its lock around the restore; stop() must never wait forever."""

    async def run() -> None:
        link = AgentLink("vm", lambda: None)

        released = asyncio.Event()

        async def stubborn() -> None:
            while not released.is_set():
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    continue  # swallows the cancellation, like 3.11's wait_for could

        task = link._task = asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)
        t = asyncio.get_running_loop().time()
        await link.stop(timeout=0.3)
        assert asyncio.get_running_loop().time() - t < 2
        assert not link.connected
        released.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())


def test_multi_mib_frames_cross_the_link_intact_both_ways(tmp_path: Path) -> None:
    """A relayed 4 MiB chunk goes out as head + payload (no joined copy) and big frames are read
    1 MiB at a time: both directions keep every byte and the frame boundaries."""
    import os

    async def run() -> None:
        path = str(tmp_path / "chan.sock")
        big = os.urandom(4 << 20)
        got: list[bytes] = []

        async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(proto.encode(proto.hello("agent", "t", ["ping"], boot_id="b", pid=1)))
            writer.write(proto.encode(proto.event("mig-chunk", {"n": 1}), big[::-1]))
            await writer.drain()
            frames = proto.FrameReader()
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    return
                for msg in frames.feed(data):
                    if msg.type == "req":
                        writer.write(proto.encode(proto.response_ok(msg.header["id"], {"n": len(msg.payload)}),
                                                  msg.payload))  # fmt: skip
                        await writer.drain()

        server = await asyncio.start_unix_server(agent, path)
        link = AgentLink("vm", lambda: path, reconnect_max=0.2)
        link.stream_handlers["mig-chunk"] = lambda data, payload: got.append(payload)
        link.start()
        try:
            async with asyncio.timeout(20):
                while not link.ready or not got:
                    await asyncio.sleep(0.05)
                result, payload = await link.request("ping", {}, payload=big)
                small, spay = await link.request("ping", {}, payload=b"abc")
            assert got == [big[::-1]]
            assert result == {"n": len(big)} and payload == big
            assert small == {"n": 3} and spay == b"abc"
        finally:
            await link.stop()
            server.close()

    asyncio.run(run())
