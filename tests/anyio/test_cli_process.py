"""The ``fastport`` command as a new user meets it: a real process, its stderr, its stdout, its exit code.

Each test runs ``python -m fastport_anyio`` (what the ``fastport`` script runs) against an in-process
server, and checks what the user sees: one line on stderr per failure and no traceback, the exit code the
docs promise, and stdout byte for byte. These are the failures of "the first hour" (issue 14); the
numbers in the section titles are that issue's items.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import pytest

import fastport_core
from fastport_anyio import Server, connect
from fastport_core.crypto import generate_key
from tests.certificates import make_certificate

from .conftest import ADMIN, FAST_CONFIG, SESSIONS, TIMEOUT, http_request

# The process under test is the CLI, which runs its own event loop (asyncio); the in-process server's two
# backends are covered by test_server.py, so one backend here halves the process start-ups for nothing lost.
pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

ROOT = Path(__file__).resolve().parents[2]
KEY = generate_key()
LOGIN = {"session": "alpha", "password": "alpha-password"}


@dataclass(frozen=True)
class Result:
    code: int
    stdout: bytes
    stderr: str


def environment(url: str | None = None, **extra: str) -> dict[str, str]:
    """The process's environment: ours without any FASTPORT_* variable, plus the session's if ``url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTPORT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if url is not None:
        env |= {"FASTPORT_URL": url, "FASTPORT_SESSION": "alpha", "FASTPORT_PASSWORD": "alpha-password"}
        env["FASTPORT_KEY"] = KEY
    return env | extra


async def fastport(*argv: str, env: Mapping[str, str], stdin: bytes | None = None) -> Result:
    with anyio.fail_after(TIMEOUT):
        done = await anyio.run_process(
            [sys.executable, "-m", "fastport_anyio", *argv], input=stdin, env=env, check=False
        )
    return Result(done.returncode, done.stdout, done.stderr.decode())


def the_one_line(stderr: str, command: str) -> str:
    """stderr must be exactly one ``fastport COMMAND: ...`` line: never a traceback."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"fastport {command}: "), stderr
    return lines[0]


class Process:
    """A long-running ``fastport`` process (``sub``) whose stderr is read line by line."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.seen = bytearray()

    async def line_matching(self, pattern: str) -> str:
        assert self.process.stderr is not None
        regex = re.compile(pattern.encode())
        with anyio.fail_after(TIMEOUT):
            while True:
                for line in self.seen.splitlines():
                    if regex.search(line):
                        return line.decode()
                self.seen += await self.process.stderr.receive()

    async def finish(self) -> Result:
        assert self.process.stderr is not None
        out = bytearray()
        with anyio.fail_after(TIMEOUT):
            if self.process.stdout is not None:  # None: the test gave the process a stdout of its own
                async for chunk in self.process.stdout:
                    out += chunk
            async for chunk in self.process.stderr:
                self.seen += chunk
            code = await self.process.wait()
        return Result(code, bytes(out), self.seen.decode())


async def start_sub(*argv: str, env: Mapping[str, str]) -> Process:
    process = await anyio.open_process([sys.executable, "-m", "fastport_anyio", "sub", *argv], env=env)
    sub = Process(process)
    await sub.line_matching("^fastport sub: subscribed to ")
    return sub


# --------------------------------------------------------------------------------------------------------
# 2. One line and a documented exit code, whatever fails


async def test_failing_invocations_print_one_line_and_their_exit_code(server: Server, tmp_path: Path) -> None:
    certfile, _keyfile = make_certificate(tmp_path)
    config = tmp_path / "fastport.toml"
    config.write_text("[defaults]\nretryInterval = -5\n", encoding="utf-8")
    server_config = tmp_path / "server.toml"
    server_config.write_text("[server]\nping_interval = -1\n", encoding="utf-8")
    good = environment(server.url)
    admin = ["--admin-user", ADMIN.user, "--admin-password", ADMIN.password, "--password", "p"]
    cases: list[tuple[list[str], Mapping[str, str], int, str]] = [
        (["pub", "", "x"], good, 2, "fastport pub: topic"),  # the wording is the client core's
        (["pub", "t" * 300, "x"], good, 2, "256"),
        (["pub", "t", "x", "--timeout", "-1"], good, 2, "--timeout must be a positive number of seconds"),
        (["pub", "t", "x", "--key", "not-a-key"], good, 2, "fastport pub: invalid key: "),
        (["pub", "t", "x", "--key-file", str(tmp_path / "nowhere")], good, 2, "cannot read --key-file"),
        (["pub", "t", "x", "--password", "wrong"], good, 1, "fastport pub: authentication refused: "),
        (["pub", "t", "x", "--cafile", str(certfile)], good, 2, "--cafile (or FASTPORT_CAFILE) is for wss://"),
        (["sub", "", "--count", "1"], good, 2, "fastport sub: topic"),
        (["session", "create", "s", "--retry-interval", "-5", *admin], good, 2,
         "fastport session: --retry-interval must be a positive number of milliseconds, got -5"),
        (["session", "create", "s", "--session-expiry", "0", *admin], good, 2,
         "fastport session: --session-expiry must be a positive number of milliseconds, got 0"),
        (["serve", "--port", "0", "--config", str(config)], good, 2,
         "[defaults]: retryInterval must be a positive number of milliseconds, got -5"),
        (["serve", "--port", "0", "--config", str(server_config)], good, 2,
         "[server]: ping_interval must be positive, got -1.0"),
        (["serve", "--port", "0", "--certfile", str(certfile)], good, 2,
         f"{certfile} holds no private key: give the key file with --keyfile"),
    ]  # fmt: skip
    for argv, env, code, expected in cases:
        result = await fastport(*argv, env=env)
        line = the_one_line(result.stderr, argv[0])
        assert (result.code, expected in line) == (code, True), (argv, line)


async def test_sub_whose_session_is_dropped_says_so_in_one_line_and_exits_1(server: Server) -> None:
    sub = await start_sub("t", env=environment(server.url))
    try:
        token = base64.b64encode(f"{ADMIN.user}:{ADMIN.password}".encode()).decode()
        body = b'{"sessionName": "alpha", "password": "alpha-password", "secretKey": "alpha-secret"}'
        status, _, _ = await http_request(
            server.port, "POST", "/api/dropSession", body=body, headers={"Authorization": f"Basic {token}"}
        )
        assert status == 200
        result = await sub.finish()
    finally:
        if sub.process.returncode is None:
            sub.process.kill()
    # Status lines (subscribed, connection lost; reconnecting), then the error: each one line, no traceback.
    lines = result.stderr.splitlines()
    assert all(line.startswith("fastport sub: ") for line in lines), result.stderr
    assert result.code == 1
    assert lines[-1].startswith("fastport sub: gave up on ") and "session dropped" in lines[-1], lines


async def test_sub_whose_reader_goes_away_stops_with_one_line(server: Server) -> None:
    """``fastport sub t | head -1``: the client swallows a handler's exceptions, so ``sub`` must notice
    the closed pipe itself rather than run on forever."""
    read_end, write_end = os.pipe()  # our own pipe: closing its read end is what `head` does
    try:
        process = await anyio.open_process(
            [sys.executable, "-m", "fastport_anyio", "sub", "t"],
            env=environment(server.url),
            stdout=write_end,
        )
    finally:
        os.close(write_end)
    sub = Process(process)
    try:
        await sub.line_matching("^fastport sub: subscribed to ")
        async with connect(server.url, **LOGIN, key=KEY) as publisher:
            await publisher.publish("t", "first")
            with anyio.fail_after(TIMEOUT):
                assert await anyio.to_thread.run_sync(os.read, read_end, 100) == b"first\n"
            os.close(read_end)
            read_end = -1
            await publisher.publish("t", "second")
            result = await sub.finish()
    finally:
        if read_end >= 0:
            os.close(read_end)
        if process.returncode is None:
            process.kill()
    lines = result.stderr.splitlines()
    assert result.code == 1
    assert lines[-1] == "fastport sub: output closed (broken pipe)", lines
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


# --------------------------------------------------------------------------------------------------------
# 3. A wrong key is reported, never silent


async def test_sub_reports_each_message_it_cannot_decrypt(server: Server) -> None:
    sub = await start_sub("--count", "1", "t", env=environment(server.url))
    try:
        async with connect(server.url, **LOGIN, key=generate_key()) as stranger:
            wrong_id = await stranger.publish("t", "sealed with another key")
        await sub.line_matching("could not be authenticated")
        async with connect(server.url, **LOGIN, key=KEY) as friend:
            await friend.publish("t", "sealed with the right key")
        result = await sub.finish()
    finally:
        if sub.process.returncode is None:
            sub.process.kill()
    assert result.code == 0
    assert result.stdout == b"sealed with the right key\n"
    (report,) = [line for line in result.stderr.splitlines() if "could not be authenticated" in line]
    assert report.startswith(f"fastport sub: message {wrong_id!r} on 't' could not be authenticated")
    assert "wrong key or suite?" in report


async def test_the_key_can_come_from_a_file(server: Server, tmp_path: Path) -> None:
    key_file = tmp_path / ".fastport-key"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    env = environment(server.url)
    del env["FASTPORT_KEY"]
    async with (
        connect(server.url, **LOGIN, key=KEY) as subscriber,
        subscriber.subscription("files") as messages,
    ):
        by_flag = await fastport("pub", "files", "one", "--key-file", str(key_file), env=env)
        by_variable = await fastport("pub", "files", "two", env=env | {"FASTPORT_KEY_FILE": str(key_file)})
        with anyio.fail_after(TIMEOUT):
            received = [(await messages.receive()).payload for _ in range(2)]
    assert (by_flag.code, by_variable.code) == (0, 0), (by_flag.stderr, by_variable.stderr)
    assert received == ["one", "two"]


# --------------------------------------------------------------------------------------------------------
# 4. TLS with a private CA


async def test_pub_and_sub_trust_a_private_ca_with_cafile(tmp_path: Path) -> None:
    certfile, keyfile = make_certificate(tmp_path)  # self-signed, so it is its own CA
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    async with Server(
        "127.0.0.1", 0, config=FAST_CONFIG, sessions=SESSIONS, admin=ADMIN, ssl_context=context
    ) as server:
        assert server.url.startswith("wss://")
        env = environment(server.url)
        untrusted = await fastport("pub", "t", "x", env=env)
        assert untrusted.code == 1
        assert "certificate verification failed" in the_one_line(untrusted.stderr, "pub")

        sub = await start_sub("--count", "1", "--cafile", str(certfile), "tls", env=env)
        try:
            by_flag = await fastport("pub", "tls", "over TLS", "--cafile", str(certfile), env=env)
            result = await sub.finish()
        finally:
            if sub.process.returncode is None:
                sub.process.kill()
        by_variable = await fastport("pub", "tls", "again", env=env | {"FASTPORT_CAFILE": str(certfile)})
    assert (by_flag.code, by_variable.code) == (0, 0), (by_flag.stderr, by_variable.stderr)
    assert (result.code, result.stdout) == (0, b"over TLS\n")


# --------------------------------------------------------------------------------------------------------
# 5. sub --raw is verbatim


async def test_sub_raw_reproduces_the_published_bytes_exactly(server: Server) -> None:
    payload = secrets.token_bytes(40) + b"\n\x00"  # random, ending in bytes a framing would eat or add
    env = environment(server.url)
    sub = await start_sub("--raw", "--count", "1", "bin", env=env)
    try:
        published = await fastport("pub", "--binary", "bin", "-", env=env, stdin=payload)
        result = await sub.finish()
    finally:
        if sub.process.returncode is None:
            sub.process.kill()
    assert published.code == 0, published.stderr
    assert result.code == 0, result.stderr
    assert result.stdout == payload


# --------------------------------------------------------------------------------------------------------
# 9. Small things


async def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    result = await fastport("--version", env=environment())
    kind = "compiled" if fastport_core.compiled() else "interpreted"  # an editable install: interpreted
    assert (result.code, result.stdout.decode()) == (0, f"fastport {version('fastport')} ({kind} core)\n")
