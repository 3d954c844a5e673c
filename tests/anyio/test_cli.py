"""The ``fastport`` command (server side): ``keygen``, ``serve``, ``session``, their errors and exit codes.

Commands that need no server run in-process through ``main([...])``. ``session`` runs in a worker thread
against an in-process server (it blocks on ``http.client``). ``serve`` itself runs as a real subprocess,
because signals only reach a process's main thread: it binds port 0 and the test reads the bound port from
its start-up log line.
"""

from __future__ import annotations

import base64
import functools
import gc
import importlib.util
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import pytest

from fastport_anyio import Server
from fastport_anyio.cli import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    GC_YOUNG_THRESHOLD,
    SECRET_KEY_NOTICE,
    build_parser,
    main,
    serve_settings,
)
from fastport_core.errors import ConnectError, LocalProtocolError

from .conftest import FAST_CONFIG, TIMEOUT, RawClient

ADMIN_ARGS = ["--admin-user", "ops", "--admin-password", "admin-secret"]
VARIABLES = (
    "FASTPORT_HOST",
    "FASTPORT_PORT",
    "FASTPORT_LOG_LEVEL",
    "FASTPORT_ADMIN_USER",
    "FASTPORT_ADMIN_PASSWORD",
    "FASTPORT_ADMIN_URL",
    "FASTPORT_PASSWORD",
    "FASTPORT_SECRET_KEY",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    yield


def one_line_error(text: str, command: str) -> str:
    """The command's stderr must be exactly one ``fastport COMMAND: ...`` line (no traceback)."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith(f"fastport {command}: "), text
    return lines[0]


# --------------------------------------------------------------------------------------------------------
# In-process: no server needed


def test_an_unexpected_error_is_one_line_asking_for_a_report_and_debug_adds_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object, environ: object = None) -> int:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [RuntimeError("a bug")])

    monkeypatch.setattr("fastport_anyio.cli.run_keygen", broken)
    monkeypatch.delenv("FASTPORT_DEBUG", raising=False)
    assert main(["keygen"]) == 1
    line = one_line_error(capsys.readouterr().err, "keygen")
    assert line.startswith("fastport keygen: unexpected error: RuntimeError: a bug (a bug in fastport: ")
    assert "--debug" in line
    for argv, debug in ((["--debug", "keygen"], None), (["keygen", "--debug"], None), (["keygen"], "1")):
        if debug is not None:
            monkeypatch.setenv("FASTPORT_DEBUG", debug)
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "RuntimeError: a bug" in err, argv
        assert err.splitlines()[-1].startswith("fastport keygen: unexpected error: RuntimeError: a bug")


def test_errors_inside_exception_groups_are_unwrapped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for error, code, expected in (
        (LocalProtocolError("topic is too long"), EXIT_USAGE, "fastport keygen: topic is too long"),
        (ConnectError("cannot connect"), EXIT_FAILURE, "fastport keygen: cannot connect"),
        (KeyboardInterrupt(), 130, None),
    ):

        def broken(args: object, environ: object = None, error: BaseException = error) -> int:
            raise BaseExceptionGroup("outer", [BaseExceptionGroup("inner", [error])])

        monkeypatch.setattr("fastport_anyio.cli.run_keygen", broken)
        assert main(["keygen"]) == code
        err = capsys.readouterr().err
        assert (one_line_error(err, "keygen") if expected else err) == (expected or "")


def test_keygen_prints_32_random_bytes_as_base64(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == EXIT_OK
    first = capsys.readouterr().out.strip()
    assert len(base64.b64decode(first, validate=True)) == 32
    main(["keygen"])
    assert capsys.readouterr().out.strip() != first


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["serve", "--help"], ["session", "create", "--help"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert "exit codes: 0 success; 1 runtime failure" in out
        assert "2 usage or configuration error" in out


def test_pub_and_sub_are_registered(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("serve", "keygen", "session", "token", "pub", "sub"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "not-a-number"])
    assert exited.value.code == EXIT_USAGE


def test_serve_with_a_bad_config_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[limits]\nmax_frame = 3\n", encoding="utf-8")
    assert main(["serve", "--config", str(config)]) == EXIT_USAGE
    line = one_line_error(capsys.readouterr().err, "serve")
    assert str(config) in line and "unknown key 'max_frame'" in line


def test_serve_with_an_unreadable_certificate_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.pem"
    assert main(["serve", "--port", "0", "--certfile", str(missing)]) == EXIT_USAGE
    line = one_line_error(capsys.readouterr().err, "serve")
    assert "cannot load the TLS certificate" in line and str(missing) in line
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate", encoding="utf-8")
    assert main(["serve", "--port", "0", "--certfile", str(garbage)]) == EXIT_USAGE
    assert "cannot load the TLS certificate" in one_line_error(capsys.readouterr().err, "serve")


def test_serve_with_only_half_the_admin_credentials_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--admin-user", "ops"]) == EXIT_USAGE
    assert "admin password missing" in one_line_error(capsys.readouterr().err, "serve")


def test_trusted_proxy_flags_replace_the_config_files(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["serve", "--trusted-proxy", "10.0.0.1", "--trusted-proxy", "fd00::/8"])
    assert serve_settings(args, environ={}).config.trusted_proxies == ("10.0.0.1", "fd00::/8")
    assert main(["serve", "--trusted-proxy", "proxy.local"]) == EXIT_USAGE
    assert "--trusted-proxy" in one_line_error(capsys.readouterr().err, "serve")


def test_a_cluster_node_needs_the_asyncio_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--cluster", "nats://127.0.0.1:4222", "--backend", "trio"]) == EXIT_USAGE
    assert "--cluster runs on the asyncio backend" in one_line_error(capsys.readouterr().err, "serve")


def test_uvloop_flag_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--uvloop", "--backend", "trio"]) == EXIT_USAGE
    assert "--uvloop needs --backend asyncio" in one_line_error(capsys.readouterr().err, "serve")
    if importlib.util.find_spec("uvloop") is None:
        assert main(["serve", "--uvloop"]) == EXIT_USAGE
        assert "uvloop is not installed" in one_line_error(capsys.readouterr().err, "serve")


def test_serve_on_a_port_in_use_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--host", "127.0.0.1", "--port", str(port)]) == EXIT_FAILURE
    line = one_line_error(capsys.readouterr().err, "serve")
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in line


@pytest.fixture
def gc_threshold() -> Iterator[None]:
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*saved)


@pytest.mark.usefixtures("gc_threshold")
def test_serve_raises_the_young_gc_generations_threshold_before_it_serves() -> None:
    gc.set_threshold(700, 10, 10)
    with socket.socket() as taken:  # serve stops at once, after the tuning
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--host", "127.0.0.1", "--port", str(taken.getsockname()[1])]) == EXIT_FAILURE
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)


def test_session_without_admin_user_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["session", "create", "s", "--password", "p"]) == EXIT_USAGE
    assert "missing --admin-user" in one_line_error(capsys.readouterr().err, "session")


def test_session_with_an_unreachable_admin_api_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["session", "create", "s", "--password", "p", "--url", f"http://127.0.0.1:{port}", *ADMIN_ARGS]
    assert main(argv) == EXIT_FAILURE
    assert "cannot reach the admin API at http://127.0.0.1:" in one_line_error(
        capsys.readouterr().err, "session"
    )


def test_session_with_a_bad_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["session", "create", "s", "--password", "p", "--url", "ftp://example", *ADMIN_ARGS]
    assert main(argv) == EXIT_USAGE
    assert "--url must be" in one_line_error(capsys.readouterr().err, "session")


# --------------------------------------------------------------------------------------------------------
# session: against an in-process server


async def run_cli(*argv: str) -> int:
    """``main(argv)`` in a worker thread, so the blocking HTTP call does not stall the server's loop."""
    code: int = await anyio.to_thread.run_sync(functools.partial(main, list(argv)))
    return code


@pytest.mark.anyio
async def test_session_create_drop_suspend_resume(
    server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = ["--url", server.url]  # a ws:// URL is accepted and means the same host and port over HTTP
    code = await run_cli(
        "session", "create", "gamma", "--password", "gamma-pw", "--retry-interval", "1000", *url, *ADMIN_ARGS
    )
    assert code == EXIT_OK
    captured = capsys.readouterr()
    created = json.loads(captured.out)
    assert created["success"] is True and created["sessionName"] == "gamma"
    secret = created["secretKey"]
    # Exactly as docs/operations.md shows it: the answer on one line, the notice on stderr.
    shown = {"success": True, "sessionName": "gamma", "password": "gamma-pw", "secretKey": secret}
    assert captured.out == json.dumps(shown | {"tokenKey": created["tokenKey"]}) + "\n"
    assert captured.err == SECRET_KEY_NOTICE + "\n"
    operations = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text(encoding="utf-8")
    shape = (
        '"sessionName": "device-fleet", "password": "fleet-password", "secretKey": "...", "tokenKey": "..."}'
    )
    assert '# stdout: {"success": true, ' + shape in operations
    assert f"# stderr: {SECRET_KEY_NOTICE}" in operations
    async with await RawClient.connect(server.port) as client:
        assert (await client.init("gamma", "gamma-pw"))["success"] is True

    monkeypatch.setenv("FASTPORT_SECRET_KEY", secret)  # the secret key may come from the environment
    for action, suspended in (("suspend", True), ("resume", False)):
        assert (
            await run_cli("session", action, "gamma", "--password", "gamma-pw", *url, *ADMIN_ARGS) == EXIT_OK
        )
        assert json.loads(capsys.readouterr().out)["suspended"] is suspended
    code = await run_cli("session", "rotate-token-key", "gamma", "--password", "gamma-pw", *url, *ADMIN_ARGS)
    assert code == EXIT_OK
    rotated = json.loads(capsys.readouterr().out)
    assert rotated["tokenKey"] != created["tokenKey"]
    assert server.core.broker.token_key("gamma") == rotated["tokenKey"]
    assert await run_cli("session", "drop", "gamma", "--password", "gamma-pw", *url, *ADMIN_ARGS) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == {"success": True, "sessionName": "gamma"}
    assert "gamma" not in server.core.session_names()


@pytest.mark.anyio
async def test_session_create_with_wrong_admin_credentials_exits_1(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["session", "create", "x", "--password", "p", "--url", server.url, "--admin-user", "ops"]
    code = await run_cli(*argv, "--admin-password", "wrong")
    assert code == EXIT_FAILURE
    assert "the admin API refused the credentials" in one_line_error(capsys.readouterr().err, "session")


@pytest.mark.anyio
async def test_session_create_of_an_existing_session_exits_1(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_cli("session", "create", "alpha", "--password", "p", "--url", server.url, *ADMIN_ARGS)
    assert code == EXIT_FAILURE
    assert "answered 409 (session_exists)" in one_line_error(capsys.readouterr().err, "session")


@pytest.mark.anyio
async def test_session_against_a_server_without_admin_api_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    async with Server("127.0.0.1", 0, config=FAST_CONFIG) as server:
        code = await run_cli("session", "create", "x", "--password", "p", "--url", server.url, *ADMIN_ARGS)
    assert code == EXIT_FAILURE
    assert "admin_disabled" in one_line_error(capsys.readouterr().err, "session")


@pytest.mark.anyio
async def test_session_reads_admin_credentials_from_the_environment(
    server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTPORT_ADMIN_USER", "ops")
    monkeypatch.setenv("FASTPORT_ADMIN_PASSWORD", "admin-secret")
    monkeypatch.setenv("FASTPORT_ADMIN_URL", f"http://127.0.0.1:{server.port}")
    monkeypatch.setenv("FASTPORT_PASSWORD", "delta-pw")
    assert await run_cli("session", "create", "delta") == EXIT_OK
    assert json.loads(capsys.readouterr().out)["sessionName"] == "delta"


# --------------------------------------------------------------------------------------------------------
# serve: a real process, stopped by SIGTERM


async def read_until(
    stream: anyio.abc.ByteReceiveStream, pattern: re.Pattern[bytes], seen: bytearray
) -> re.Match[bytes]:
    with anyio.fail_after(TIMEOUT):
        while (match := pattern.search(seen)) is None:
            seen += await stream.receive()
    return match


@pytest.mark.anyio
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_serve_subprocess_on_port_zero_stops_on_sigterm_with_exit_0(
    anyio_backend: str, tmp_path: Path
) -> None:
    config = tmp_path / "fastport.toml"
    config.write_text(
        '[server]\npassword_hash_cost = 16\n\n[[sessions]]\nname = "demo"\npassword = "demo-password"\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTPORT_")}
    command = [sys.executable, "-m", "fastport_anyio", "serve", "--config", str(config), "--port", "0"]
    command += ["--backend", anyio_backend, *ADMIN_ARGS]
    async with await anyio.open_process(command, env=env) as process:
        assert process.stderr is not None
        log = bytearray()
        try:
            match = await read_until(
                process.stderr, re.compile(rb"listening on ws://127\.0\.0\.1:(\d+)"), log
            )
            port = int(match.group(1))
            await read_until(process.stderr, re.compile(rb"1 session\(s\) loaded: demo"), log)
            assert b"admin API enabled" in log
            async with await RawClient.connect(port) as client:
                assert (await client.init("demo", "demo-password"))["success"] is True
                process.send_signal(signal.SIGTERM)
                closed = await client.receive_close()
                assert closed.code == 1001
            with anyio.fail_after(TIMEOUT):
                assert await process.wait() == EXIT_OK
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        rest = bytearray()
        async for chunk in process.stderr:
            rest += chunk
        assert b"SIGTERM received: stopping gracefully" in log + rest
        assert b"Traceback" not in log + rest


def test_serve_takes_the_per_address_bound_from_its_flag() -> None:
    args = build_parser().parse_args(["serve", "--max-uninitialised-per-address", "7"])
    assert serve_settings(args, environ={}).config.limits.max_uninitialised_per_address == 7
