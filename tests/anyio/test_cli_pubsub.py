"""``fastport pub`` / ``fastport sub`` against a live in-process server.

The commands run for real (``fastport_anyio.cli.main([...])``, which calls ``anyio.run``) in a worker thread, so they have an
event loop of their own beside the test's server. The output format is also tested through the
:func:`~fastport_anyio.cli_pubsub.subscribe` coroutine directly, which has a readiness hook.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from anyio.abc import SocketAttribute

from fastport_anyio import Server, connect
from fastport_anyio.cli import main
from fastport_anyio.cli_pubsub import ConnectionOptions, format_message, subscribe
from fastport_core.client_api import Message
from fastport_core.crypto import generate_key

from .conftest import TIMEOUT

KEY = generate_key()
VARIABLES = (
    "FASTPORT_URL", "FASTPORT_SESSION", "FASTPORT_PASSWORD", "FASTPORT_KEY", "FASTPORT_SUITE", "FASTPORT_TOKEN",
)  # fmt: skip


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    yield


def use_server(monkeypatch: pytest.MonkeyPatch, server: Server, *, password: str = "alpha-password") -> None:
    """The commands read everything from the environment (the flags are tested separately)."""
    monkeypatch.setenv("FASTPORT_URL", server.url)
    monkeypatch.setenv("FASTPORT_SESSION", "alpha")
    monkeypatch.setenv("FASTPORT_PASSWORD", password)
    monkeypatch.setenv("FASTPORT_KEY", KEY)


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.anyio
async def test_sub_count_and_pub_round_trip(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_server(monkeypatch, server)
    codes: dict[str, int] = {}
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as task_group:

            async def run_sub() -> None:
                codes["sub"] = await anyio.to_thread.run_sync(main, ["sub", "--count", "2", "-q", "ticks"])

            task_group.start_soon(run_sub)
            # Messages published before `sub` subscribed reach nobody, so tick until it has printed
            # two and exited (the loop is bounded by fail_after).
            async with connect(server.url, session="alpha", password="alpha-password", key=KEY) as publisher:
                tick = 0
                while "sub" not in codes:
                    await publisher.publish("ticks", f"tick {tick}")
                    tick += 1
                    await anyio.sleep(0.02)
    assert codes["sub"] == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("tick ")
    assert second == f"tick {int(first.split()[1]) + 1}"

    with anyio.fail_after(TIMEOUT):
        async with (
            connect(server.url, session="alpha", password="alpha-password", key=KEY) as subscriber,
            subscriber.subscription("greetings") as messages,
        ):
            code = await anyio.to_thread.run_sync(main, ["pub", "greetings", "hello from a shell"])
            text = await messages.receive()
            binary_code = await anyio.to_thread.run_sync(main, ["pub", "--binary", "greetings", "bytes ✓"])
            binary = await messages.receive()
    assert code == binary_code == 0
    ids = capsys.readouterr().out.split()
    assert ids == [text.message_id, binary.message_id]
    assert text.payload == "hello from a shell"
    assert binary.payload == "bytes ✓".encode()


@pytest.mark.anyio
async def test_sub_output_formats(server: Server) -> None:
    options = ConnectionOptions(server.url, "alpha", "alpha-password", KEY, "authenticated")
    for raw, verbose, expected in (
        (False, False, b"plain text\n" + base64.b64encode(b"\x00\xff") + b"\n"),
        (True, False, b"plain text\x00\xff"),  # --raw: verbatim, nothing added
    ):
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        with anyio.fail_after(TIMEOUT):
            async with (
                connect(server.url, session="alpha", password="alpha-password", key=KEY) as publisher,
                anyio.create_task_group() as task_group,
            ):
                ready = anyio.Event()
                task_group.start_soon(
                    functools.partial(
                        subscribe,
                        options,
                        ["t"],
                        out=out,
                        count=2,
                        raw=raw,
                        verbose=verbose,
                        on_ready=ready.set,
                    )
                )
                await ready.wait()
                await publisher.publish("t", "plain text")
                await publisher.publish("t", b"\x00\xff")
        out.flush()
        assert out.buffer.getvalue() == expected


def test_format_message() -> None:
    assert format_message(Message("t", "a b", "id", 0), verbose=False) == "a b"
    assert format_message(Message("t", b"\x01", "id", 0), verbose=True) == "t AQ=="


@pytest.mark.anyio
async def test_wrong_password_exits_1(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_server(monkeypatch, server, password="wrong")
    with anyio.fail_after(TIMEOUT):
        code = await anyio.to_thread.run_sync(main, ["pub", "t", "message"])
    assert code == 1
    assert one_line(capsys.readouterr().err).startswith("fastport pub: authentication refused: ")


def test_bad_key_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sub", "t", "--session", "s", "--password", "p", "--key", "not-a-key"])
    assert code == 2
    assert one_line(capsys.readouterr().err).startswith("fastport sub: invalid key: ")


def test_missing_settings_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTPORT_PASSWORD", "p")
    assert main(["pub", "t", "m", "--key", KEY]) == 2
    assert one_line(capsys.readouterr().err) == "fastport pub: missing --session (or FASTPORT_SESSION)"
    with pytest.raises(SystemExit) as exited:  # argparse's own usage errors
        main(["pub", "t"])
    assert exited.value.code == 2


async def _closed_port() -> int:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(listener.extra(SocketAttribute.local_port))
    await listener.aclose()
    return port


def test_unreachable_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = anyio.run(_closed_port)
    url = f"ws://127.0.0.1:{port}"
    code = main(["pub", "t", "m", "--url", url, "--session", "s", "--password", "p", "--key", KEY])
    assert code == 1
    assert one_line(capsys.readouterr().err).startswith(f"fastport pub: cannot connect to {url}: ")


def test_bad_url_and_topic_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--session", "s", "--password", "p", "--key", KEY]
    assert main(["pub", "t", "m", "--url", "http://example.invalid", *common]) == 2
    assert "ws:// or wss://" in one_line(capsys.readouterr().err)
    assert main(["sub", "t", "--count", "0", *common]) == 2
    assert one_line(capsys.readouterr().err) == "fastport sub: --count must be at least 1"


@pytest.mark.anyio
async def test_pub_reads_stdin(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    use_server(monkeypatch, server)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\x00binary\xff from stdin")))
    with anyio.fail_after(TIMEOUT):
        async with (
            connect(server.url, session="alpha", password="alpha-password", key=KEY) as subscriber,
            subscriber.subscription("files") as messages,
        ):
            code = await anyio.to_thread.run_sync(main, ["pub", "--binary", "files", "-"])
            message = await messages.receive()
    assert code == 0
    assert message.payload == b"\x00binary\xff from stdin"


def test_pub_refuses_non_utf8_text_on_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe")))
    assert main(["pub", "t", "-", "--session", "s", "--password", "p", "--key", KEY]) == 2
    assert (
        one_line(capsys.readouterr().err) == "fastport pub: stdin is not UTF-8 text: publish it with --binary"
    )


@pytest.mark.anyio
async def test_pub_as_a_process(server: Server) -> None:
    root = Path(__file__).resolve().parents[2]
    environment = os.environ | {
        "FASTPORT_URL": server.url,
        "FASTPORT_SESSION": "alpha",
        "FASTPORT_PASSWORD": "alpha-password",
        "FASTPORT_KEY": KEY,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    with anyio.fail_after(TIMEOUT):
        async with (
            connect(server.url, session="alpha", password="alpha-password", key=KEY) as subscriber,
            subscriber.subscription("proc") as messages,
        ):
            command = [sys.executable, "-m", "fastport_anyio", "pub", "proc", "from a process"]
            result = await anyio.run_process(command, env=environment, check=False)
            message = await messages.receive()
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == message.message_id
    assert message.payload == "from a process"


def test_password_and_token_together_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["--session", "s", "--key", KEY, "t", "m"]
    assert main(["pub", "--password", "p", "--token", "x", *base]) == 2
    assert "give --password or --token, not both" in capsys.readouterr().err
    monkeypatch.setenv("FASTPORT_PASSWORD", "p")
    monkeypatch.setenv("FASTPORT_TOKEN", "x")
    assert main(["pub", *base]) == 2
    assert "FASTPORT_PASSWORD or FASTPORT_TOKEN, not both" in capsys.readouterr().err
    monkeypatch.delenv("FASTPORT_PASSWORD")
    assert main(["pub", "--session", "s", "t", "m"]) == 2
    assert "--key" in capsys.readouterr().err
