"""``symbiont.cli.call_and_show``: the one "call the API, print ``--json`` or a line/table"
that the part CLIs share (through click's CliRunner, against a recorded client)."""

from __future__ import annotations

import json
from typing import Any

import click
import pytest
from click.testing import CliRunner

import symbiont.cli as sc
from symbiont.client import ApiError


class RecordingClient:
    """Stands in for :class:`symbiont.client.Client`: records each call, answers from ``answers``."""

    calls: list[tuple[str, str, Any, Any]] = []
    answers: dict[tuple[str, str], Any] = {}

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def __enter__(self) -> RecordingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def call(self, method: str, path: str, json: Any = None, params: Any = None) -> Any:
        RecordingClient.calls.append((method, path, json, params))
        answer = RecordingClient.answers[(method, path)]
        if isinstance(answer, ApiError):
            raise answer
        return answer


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> type[RecordingClient]:
    RecordingClient.calls, RecordingClient.answers = [], {}
    monkeypatch.setattr(sc, "Client", RecordingClient)
    return RecordingClient


shown: list[Any] = []


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def probe(ctx: sc.Ctx, as_json: bool) -> None:
    r = sc.call_and_show(ctx, "PUT", "/v1/things/a", as_json, shown.append, {"n": 3}, mode="fast")
    click.echo(f"returned {r['id']}")


def run(*args: str) -> Any:
    shown.clear()
    return CliRunner().invoke(probe, list(args), obj=sc.Ctx(None, "/run/test.sock"))


def test_json_prints_the_answer_and_not_the_view(client: type[RecordingClient]) -> None:
    client.answers[("PUT", "/v1/things/a")] = {"id": "a", "size": 2}
    r = run("--json")
    assert r.exit_code == 0, r.output
    assert client.calls == [("PUT", "/v1/things/a", {"n": 3}, {"mode": "fast"})]
    body, _, tail = r.output.rpartition("}\n")
    assert json.loads(body + "}") == {"id": "a", "size": 2} and tail == "returned a\n"
    assert shown == []


def test_without_json_the_formatter_gets_the_answer(client: type[RecordingClient]) -> None:
    client.answers[("PUT", "/v1/things/a")] = {"id": "a", "size": 2}
    r = run()
    assert r.exit_code == 0 and r.output == "returned a\n"
    assert shown == [{"id": "a", "size": 2}]


def test_api_error_exits_with_its_reason_and_shows_nothing(client: type[RecordingClient]) -> None:
    client.answers[("PUT", "/v1/things/a")] = ApiError(404, "no thing 'a'")
    r = run()
    assert r.exit_code == 2 and "404 no thing 'a'" in r.output and "returned" not in r.output
    assert shown == []


def test_part_command_through_the_helper(client: type[RecordingClient]) -> None:
    """``symbiont paging wake``: query parameters reach the API, the line reads as before."""
    from symbiont.paging.cli import group

    client.answers[("POST", "/v1/paging/vms/a/wake")] = {"latency_s": 0.1, "prefetched_mib": 0, "prefetch_s": None}
    r = CliRunner().invoke(group, ["wake", "a", "--no-prefetch"], obj=sc.Ctx(None, "/run/test.sock"))
    assert r.exit_code == 0, r.output
    assert client.calls == [("POST", "/v1/paging/vms/a/wake", None, {"prefetch": "false"})]
    assert r.output == "a: awake, answered in 0.1 s (prefetch off: 0 MiB in - s)\n"
