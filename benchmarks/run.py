"""Load benchmark: the fastport anyio server side by side with a Node model of the original, one run.

Run by hand, never from the test suite (speed is never asserted)::

    .venv/bin/python benchmarks/run.py            # full: ~3-4 min, writes docs/performance.md's tables
    .venv/bin/python benchmarks/run.py --quick    # small counts, one repetition: ~30 s, prints only
    .venv/bin/python benchmarks/run.py --profile  # full, then where the time goes (py-spy, strace): +3 min

What it does, and why:

* **Processes and CPUs.** Two servers run at once, each a separate process pinned to CPU 0: ``fastport
  serve`` (the console script, with a config file declaring the bench session) and
  ``node benchmarks/node_reference/server.js`` (the model of the original; ``npm install`` brings ``ws``
  on first run). The load generator (``benchmarks/loadgen.py``: one publisher process and one process
  holding every subscriber connection) and this driver are pinned to CPU 1. The servers never compete
  with their load for a core; the idle server costs nothing measurable (no connection; Node's retry loop
  scans an empty cache once a second).
* **Side by side.** This machine is shared and noisy, so absolute figures drift from run to run; the
  figures that mean something are the fastport/Node ratios of measurements made back to back. Each
  scenario is repeated, the order of the two servers alternating (A B, B A, ...), and the ratio is taken
  per pair; the tables give the median.
* **Server CPU.** utime + stime of the server process over the measured interval (from the publisher's
  "go" to the moment the last subscriber connection has every message), read through the kernel's
  process CPU clock (``clock_gettime`` on the pid's CPU clock: the quantity ``/proc/<pid>/stat`` reports,
  at nanosecond instead of 10-ms resolution; both readings go to the JSON). Divided by the messages
  published (1:1) and by the deliveries (fan-out).
* **Warm-up.** Each server first serves one unrecorded round of the main scenarios, so V8 has compiled
  its hot path and both processes have grown their buffers.

Results: a Markdown section of ``docs/performance.md`` (between ``<!-- BEGIN RESULTS -->`` and
``<!-- END RESULTS -->``; ``--profile`` fills ``PROFILE``, and ``benchmarks/core_bench.py``'s table goes
in ``CORE``; quick, ``--only`` and ``--no-doc`` runs leave the page alone) and the raw measurements as
JSON in ``benchmarks/results/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import orjson

ROOT: Final = Path(__file__).resolve().parent.parent
BENCH: Final = ROOT / "benchmarks"
NODE_DIR: Final = BENCH / "node_reference"
RESULTS_DIR: Final = BENCH / "results"
DOC: Final = ROOT / "docs" / "performance.md"
PYTHON: Final = sys.executable
HOST: Final = "127.0.0.1"
SESSION: Final = "bench"
PASSWORD: Final = "bench-password-0123456789"
SERVER_CODE: Final = ("fastport_core", "fastport_anyio")
"""What the figures depend on: the run's metadata says whether it differs from the commit."""
SERVER_CPU: Final = 0
LOAD_CPU: Final = 1
TIMES: Final = "\u00d7"
DASH: Final = "\u2013"
PROFILE_ATTEMPTS: Final = 3
"""Profiled measurements per scenario; the least disturbed one is kept (see :func:`profile`)."""
PROFILE_RATE: Final = 499
"""py-spy samples per second (prime, so that it does not beat with a periodic activity of the server). Each
sample stops the process for a moment: fewer samples, less disturbance."""
SETUP_TIMEOUT: Final = 60.0
"""Seconds a server or a load-generator process has to get ready before the run is abandoned."""

FASTPORT_CONFIG: Final = f"""\
# Written by benchmarks/run.py. Everything at its default except:
[server]
log_level = "WARNING"      # nothing is logged per message anyway; keeps the log file small
password_hash_cost = 1024  # scrypt at 2**14 costs ~50 ms per init: setup only, outside the measured interval

[[sessions]]
name = "{SESSION}"
password = "{PASSWORD}"
"""


@dataclass(frozen=True, slots=True)
class Scenario:
    """One load shape: ``subscribers`` connections receive every publish of one publisher."""

    key: str
    label: str
    subscribers: int
    window: int
    count: int
    """Messages published per measurement (full mode)."""
    rate: float = 0.0
    """Paced publishes per second; 0: as fast as the window allows."""
    trickle: bool = False


MAIN: Final = (
    Scenario("1to1_w100", "1 → 1, window 100", 1, 100, 30_000),
    Scenario("1to50_w100", "1 → 50, window 100", 50, 100, 2_000),
)
TRICKLE: Final = (
    Scenario("1to1_w10", "1 → 1, window 10", 1, 10, 12_000, trickle=True),
    Scenario("1to1_w1", "1 → 1, window 1", 1, 1, 4_000, trickle=True),
    Scenario("1to1_r1000", "1 → 1, 1000 msg/s paced", 1, 100, 3_000, rate=1000, trickle=True),
    Scenario("1to1_r200", "1 → 1, 200 msg/s paced", 1, 100, 600, rate=200, trickle=True),
    Scenario("1to50_w10", "1 → 50, window 10", 50, 10, 1_000, trickle=True),
    Scenario("1to50_w1", "1 → 50, window 1", 50, 1, 400, trickle=True),
    Scenario("1to50_r1000", "1 → 50, 1000 msg/s paced", 50, 100, 2_000, rate=1000, trickle=True),
    Scenario("1to50_r200", "1 → 50, 200 msg/s paced", 50, 100, 400, rate=200, trickle=True),
)


@dataclass(frozen=True, slots=True)
class Mode:
    """How much to measure: ``scale`` multiplies every count (rates keep their pace, so run shorter)."""

    scale: float
    reps_main: int
    reps_trickle: int
    cap: float
    """Wall-clock seconds any one measurement may take."""


FULL: Final = Mode(scale=1.0, reps_main=3, reps_trickle=2, cap=60.0)
QUICK: Final = Mode(scale=0.2, reps_main=1, reps_trickle=1, cap=20.0)


# -- processes -------------------------------------------------------------------------------------------


def _pin(cpu: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` pinning the child (and every thread it will start) to ``cpu``, if it exists."""
    if not hasattr(os, "sched_setaffinity") or cpu not in os.sched_getaffinity(0):
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class LineReader:
    """Read whole lines from a child's stdout with a timeout (select on the raw fd, our own buffer)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._fd = stream.fileno()
        self._buffer = b""

    def line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._fd], [], [], remaining)[0]:
                raise TimeoutError(f"no line within {timeout:.0f} s")
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise EOFError("the process ended without a result line")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


class ServerProcess:
    """A server under test: pinned to :data:`SERVER_CPU`, its CPU time readable while it runs."""

    def __init__(
        self, name: str, command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.port = port
        self.command = command
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=_pin(SERVER_CPU), env=env,  # noqa: PLW1509 - the driver has one thread
        )  # fmt: skip
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_listening(self) -> None:
        deadline = time.monotonic() + SETUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}); see {self.log_path}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1.0):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on port {self.port}; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """utime + stime of every thread, ns resolution: the process CPU clock (CPUCLOCK_SCHED of pid)."""
        return time.clock_gettime((~self.pid << 3) | 2)

    def stat_seconds(self) -> tuple[float, float]:
        """(utime, stime) from ``/proc/<pid>/stat``, in clock ticks: the cross-check of
        :meth:`cpu_seconds`, and the split between the server's own code and the kernel's work for it
        (system calls), which the profile uses."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def schedstat(self) -> tuple[float, float]:
        """(seconds on the CPU, seconds runnable but waiting for it) summed over the process's threads.

        The second figure is the noise this run suffered: time the server was ready to work while another
        process (of this shared machine) held its CPU. Threads that ended meanwhile are not counted.
        """
        running = waiting = 0
        for stat in Path(f"/proc/{self.pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError):
                run_ns, wait_ns, _ = stat.read_text().split()
                running += int(run_ns)
                waiting += int(wait_ns)
        return running / 1e9, waiting / 1e9

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def start_fastport(
    workdir: Path, backend: str, store: Path | None = None, *, compiled: Path | None = None
) -> ServerProcess:
    """``fastport serve`` on a free port; with ``store``, durable (named ``fastport-durable``); with
    ``compiled``, its packages imported from there (:func:`build_compiled`; named ``fastport-compiled``)."""
    config = workdir / "fastport.toml"
    config.write_text(FASTPORT_CONFIG)
    fastport = Path(PYTHON).parent / "fastport"
    port = _free_port()
    command = [
        str(fastport), "serve", "--host", HOST, "--port", str(port), "--config", str(config),
        *(["--backend", "asyncio", "--uvloop"] if backend == "uvloop" else ["--backend", backend]),
    ]  # fmt: skip
    name = "fastport"
    env = None
    if compiled is not None:
        env = {**os.environ, "PYTHONPATH": str(compiled)}
        name += "-compiled"
    if store is not None:
        command += ["--store", str(store)]
        name += "-durable"
    server = ServerProcess(name, command, port, workdir / f"{name}.log", env)
    server.wait_listening()
    return server


def build_compiled(workdir: Path) -> Path:
    """Build fastport with its core compiled (``FASTPORT_COMPILE=1``, setup.py; ~40 s) and unpack the wheel
    into a folder of ``workdir``, which :func:`start_fastport` puts first on a server's import path."""
    wheels = workdir / "wheels"
    print("building the compiled core (FASTPORT_COMPILE=1 pip wheel, ~40 s)...", flush=True)
    built = subprocess.run(
        [PYTHON, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
        check=False, cwd=workdir, env={**os.environ, "FASTPORT_COMPILE": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    if built.returncode != 0:
        raise RuntimeError(f"building the compiled core failed:\n{built.stderr[-3000:]}")
    (wheel,) = wheels.glob("fastport-*.whl")
    target = workdir / "compiled-core"
    shutil.unpack_archive(wheel, target, format="zip")
    return target


def ensure_node_model() -> str:
    """Install ``ws`` for the Node model on first use (``npm install``; node_modules is git-ignored)."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed: the side-by-side comparison needs Node.js")
    if not (NODE_DIR / "node_modules" / "ws" / "package.json").exists():
        print("installing the Node model's dependency (npm install ws)...", flush=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return node


def start_node(node: str, workdir: Path) -> ServerProcess:
    port = _free_port()
    command = [
        node, str(NODE_DIR / "server.js"), "--host", HOST, "--port", str(port),
        "--session", f"{SESSION}:{PASSWORD}",
    ]  # fmt: skip
    server = ServerProcess("node", command, port, workdir / "node.log")
    server.wait_listening()
    return server


def _loadgen(role: str, params: dict[str, Any]) -> tuple[subprocess.Popen[bytes], LineReader]:
    process = subprocess.Popen(
        [PYTHON, str(BENCH / "loadgen.py"), role, orjson.dumps(params).decode()],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        preexec_fn=_pin(LOAD_CPU),  # noqa: PLW1509 - the driver has one thread
    )  # fmt: skip
    assert process.stdout is not None
    return process, LineReader(process.stdout)


# -- one measurement -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Measurement:
    """One scenario against one server: what the table shows, and enough raw data to recompute it."""

    server: str
    scenario: str
    rep: int
    count: int
    subscribers: int
    ok: bool = False
    problem: str | None = None
    deliveries: int = 0
    duration_s: float = 0.0
    msg_per_s: float = 0.0
    deliveries_per_s: float = 0.0
    server_cpu_s: float = 0.0
    server_stat_cpu_s: float = 0.0
    """utime + stime from /proc/<pid>/stat (10-ms ticks), the cross-check of ``server_cpu_s``."""
    server_system_share: float = 0.0
    """stime / (utime + stime) from /proc/<pid>/stat: the share of the CPU spent in the kernel."""
    us_per_message: float = 0.0
    us_per_delivery: float = 0.0
    server_busy: float = 0.0
    """Server CPU seconds per wall second of the interval: ~1.0 means the server was the bottleneck."""
    server_wait_s: float = 0.0
    """Seconds the server was runnable but another process held its CPU (the machine's noise)."""
    redeliveries: int = 0
    """Messages received a second time (server retries): counted, not a failure."""
    loadgen_us_per_message: float = 0.0
    deliveries_per_read: float = 0.0
    """Messages a subscriber connection found per ``recv``: how much the server batched its writes (and
    so, roughly, how much it had to process per wake-up). Per-message cost falls as this grows."""
    latency_us: dict[str, float] = field(default_factory=dict)
    publisher: dict[str, Any] = field(default_factory=dict)
    subscribers_result: dict[str, Any] = field(default_factory=dict)


_run_counter = 0


def measure(
    server: ServerProcess,
    scenario: Scenario,
    mode: Mode,
    rep: int,
    around: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Measurement:
    """Run ``scenario`` once against ``server``; the processes are started and ended here.

    ``around``, if given, is entered once every connection is set up and left when the interval is over
    (a profiler or a syscall counter attaches there, so that set-up and teardown stay out of it).
    ``extra``: more load-generator parameters (``resumable``: subscribers with a ``clientId``).
    """
    global _run_counter  # noqa: PLW0603 - one counter per driver run: message ids never repeat
    _run_counter += 1
    count = max(1, round(scenario.count * mode.scale))
    result = Measurement(server.name, scenario.key, rep, count, scenario.subscribers)
    params = {
        "host": HOST, "port": server.port, "session": SESSION, "password": PASSWORD,
        "prefix": f"r{_run_counter}-{os.getpid()}-", "count": count, "window": scenario.window,
        "rate": scenario.rate, "connections": scenario.subscribers, "cap": mode.cap, **(extra or {}),
    }  # fmt: skip
    processes: list[subprocess.Popen[bytes]] = []
    try:
        subs, subs_out = _loadgen("subscribers", params)
        processes.append(subs)
        _expect_ready(subs_out.line(SETUP_TIMEOUT))
        pub, pub_out = _loadgen("publisher", params)
        processes.append(pub)
        _expect_ready(pub_out.line(SETUP_TIMEOUT))
        time.sleep(0.1)  # let the server finish the set-up's bookkeeping before the interval starts
        with around() if around is not None else contextlib.nullcontext():
            cpu0, stat0, sched0 = server.cpu_seconds(), server.stat_seconds(), server.schedstat()
            assert pub.stdin is not None
            pub.stdin.write(b"go\n")
            pub.stdin.flush()
            subs_result = orjson.loads(subs_out.line(mode.cap + 10))
            cpu1, stat1, sched1 = server.cpu_seconds(), server.stat_seconds(), server.schedstat()
        pub_result = orjson.loads(pub_out.line(mode.cap + 10))
    except (TimeoutError, EOFError, RuntimeError, orjson.JSONDecodeError) as exc:
        result.problem = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
            if process.poll() is None:
                process.kill()
                process.wait()
    time.sleep(0.2)  # the servers close the connections before the next interval starts
    result.publisher, result.subscribers_result = pub_result, subs_result
    result.problem = _problem(pub_result, subs_result, count, scenario.subscribers)
    if "start_ns" not in pub_result or not subs_result.get("last_ns"):
        return result
    result.ok = result.problem is None
    result.deliveries = int(subs_result["deliveries"])
    result.duration_s = (subs_result["last_ns"] - pub_result["start_ns"]) / 1e9
    result.msg_per_s = count / result.duration_s
    result.deliveries_per_s = result.deliveries / result.duration_s
    result.server_cpu_s = cpu1 - cpu0
    user, system = stat1[0] - stat0[0], stat1[1] - stat0[1]
    result.server_stat_cpu_s = user + system
    result.server_system_share = system / (user + system) if user + system else 0.0
    result.us_per_message = result.server_cpu_s / count * 1e6
    result.us_per_delivery = result.server_cpu_s / max(1, result.deliveries) * 1e6
    result.server_busy = result.server_cpu_s / result.duration_s
    result.server_wait_s = sched1[1] - sched0[1]
    result.loadgen_us_per_message = (pub_result["cpu_s"] + subs_result["cpu_s"]) / count * 1e6
    result.latency_us = subs_result["latency_us"]
    result.redeliveries = int(subs_result["duplicates"])
    result.deliveries_per_read = result.deliveries / max(1, subs_result["reads"])
    return result


def _expect_ready(line: str) -> None:
    message = orjson.loads(line)
    if not message.get("ready"):
        raise RuntimeError(f"load generator failed during set-up: {message.get('error', message)}")


def _problem(pub: dict[str, Any], subs: dict[str, Any], count: int, subscribers: int) -> str | None:
    problems = []
    for role in (pub, subs):
        if role.get("error"):
            problems.append(f"{role['role']}: {role['error']}")
        if role.get("timed_out"):
            problems.append(f"{role['role']}: timed out")
        if role.get("first_error"):
            problems.append(f"{role['role']}: {role['first_error']}")
    if pub.get("confirmed", 0) != count:
        problems.append(f"publisher: {pub.get('confirmed', 0)}/{count} publishes confirmed")
    if subs.get("deliveries", 0) != count * subscribers:
        problems.append(f"subscribers: {subs.get('deliveries', 0)}/{count * subscribers} deliveries")
    return "; ".join(problems) or None


# -- a whole run -----------------------------------------------------------------------------------------


def run_all(servers: list[ServerProcess], mode: Mode, scenarios: tuple[Scenario, ...]) -> list[Measurement]:
    """Every scenario, repeated, the servers' order alternating per repetition (A B, B A, ...)."""
    results: list[Measurement] = []
    for scenario in scenarios:
        reps = mode.reps_trickle if scenario.trickle else mode.reps_main
        for rep in range(reps):
            order = servers if rep % 2 == 0 else servers[::-1]
            for server in order:
                one = measure(server, scenario, mode, rep)
                results.append(one)
                _print_measurement(one)
    return results


def warm_up(servers: list[ServerProcess], mode: Mode) -> None:
    """One unrecorded pass of the main scenarios per server (V8's JIT, buffers, allocator arenas)."""
    warm = Mode(scale=mode.scale * 0.3, reps_main=1, reps_trickle=0, cap=mode.cap)
    for server in servers:
        for scenario in MAIN:
            one = measure(server, scenario, warm, -1)
            if not one.ok:
                raise RuntimeError(f"warm-up against {server.name} failed: {one.problem}")
    print(f"warmed up: {', '.join(server.name for server in servers)}", flush=True)


def _print_measurement(m: Measurement) -> None:
    if not m.ok and not m.deliveries:
        print(f"  {m.scenario:<12} {m.server:<9} FAILED: {m.problem}", flush=True)
        return
    note = f"  ({m.problem})" if m.problem else ""
    print(
        f"  {m.scenario:<12} {m.server:<9} {m.msg_per_s:9.0f} msg/s  {m.us_per_message:7.1f} µs/msg "
        f"{m.us_per_delivery:6.1f} µs/deliv  p50 {m.latency_us.get('p50', 0):8.0f} µs  "
        f"p99 {m.latency_us.get('p99', 0):8.0f} µs  busy {m.server_busy:4.0%} "
        f"waited {m.server_wait_s:5.2f} s  {m.deliveries_per_read:5.1f} msg/read{note}",
        flush=True,
    )


# -- tables ----------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _pairs(results: list[Measurement], scenario: str) -> list[tuple[Measurement, Measurement]]:
    """(fastport, node) measurements of the same repetition, both successful."""
    by_rep: dict[int, dict[str, Measurement]] = {}
    for m in results:
        if m.scenario == scenario and m.ok:
            by_rep.setdefault(m.rep, {})[m.server] = m
    return [(r["fastport"], r["node"]) for r in by_rep.values() if "fastport" in r and "node" in r]


def _ok(results: list[Measurement], scenario: str, server: str) -> list[Measurement]:
    return [m for m in results if m.scenario == scenario and m.server == server and m.ok]


def _ratio_cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "n/a"
    median = f"{_median(values):.{digits}f}{TIMES}"
    if len(values) == 1:
        return median
    return f"{median} ({min(values):.{digits}f}{DASH}{max(values):.{digits}f})"


def _fmt(value: float, digits: int = 0) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"  # NaN: no successful measurement


def three_way_table(
    results: list[Measurement], servers: tuple[str, str, str], labels: tuple[str, str, str],
    scenarios: tuple[Scenario, ...],
) -> str:  # fmt: skip
    """Medians per server, then the CPU ratios of ``servers`` = (base, variant, reference) measured in the
    same rounds: variant / base, variant / reference, base / reference (``labels`` name the three)."""
    lines = [
        "| scenario | server | msg/s | server µs per msg | per delivery | confirm p50 ms | confirm p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scenario in scenarios:
        for name in servers:
            ok = _ok(results, scenario.key, name)
            if not ok:
                lines.append(f"| {scenario.label} | {name} | failed | | | | |")
                continue
            p50 = _median([m.publisher.get("confirm_us", {}).get("p50", math.nan) for m in ok]) / 1000
            p99 = _median([m.publisher.get("confirm_us", {}).get("p99", math.nan) for m in ok]) / 1000
            rate, per_message = _median([m.msg_per_s for m in ok]), _median([m.us_per_message for m in ok])
            lines.append(
                f"| {scenario.label} | {name} | {rate:,.0f} | {per_message:.1f} "
                f"| {_median([m.us_per_delivery for m in ok]):.1f} | {p50:.2f} | {p99:.2f} |"
            )
    base, variant, reference = labels
    lines += [
        "",
        f"| scenario | {variant} / {base} CPU | {variant} / {reference} CPU | {base} / {reference} CPU |",
        "| --- | --- | --- | --- |",
    ]
    for scenario in scenarios:
        per = {name: [m.us_per_delivery for m in _ok(results, scenario.key, name)] for name in servers}
        if not all(per.values()):
            continue
        b, v, r = (_median(per[name]) for name in servers)
        lines.append(f"| {scenario.label} | {v / b:.2f}{TIMES} | {v / r:.2f}{TIMES} | {b / r:.2f}{TIMES} |")
        lines.append(
            "| (ranges, µs per delivery) | "
            + " | ".join(f"{name} {min(v):.1f}{DASH}{max(v):.1f}" for name, v in per.items())
            + " |"
        )
    return "\n".join(lines)


def rotating_rounds(
    servers: list[ServerProcess], scenarios: tuple[Scenario, ...], mode: Mode, rounds: int,
    extra: dict[str, Any] | None = None,
) -> list[Measurement]:  # fmt: skip
    """Each scenario once per server per round, the servers' order rotating every round."""
    results: list[Measurement] = []
    for rep in range(rounds):
        order = servers[rep % len(servers) :] + servers[: rep % len(servers)]
        for scenario in scenarios:
            for server in order:
                one = measure(server, scenario, mode, rep, extra=extra)
                _print_measurement(one)
                results.append(one)
    return results


def three_way_main(
    args: argparse.Namespace,
    start: Callable[[Path, str, list[ServerProcess]], None],
    labels: tuple[str, str, str],
    scenarios: tuple[Scenario, ...],
    extra: dict[str, Any] | None = None,
) -> None:
    """What the three-server benchmarks (durable_bench.py, compiled_bench.py) share: ``start`` appends the
    three servers (base, variant, the Node model) to its list, given a work folder and ``node``; then a
    warm-up, :func:`rotating_rounds` (3, or 1 with ``args.quick``) and :func:`three_way_table`."""
    mode = QUICK if args.quick else FULL
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {LOAD_CPU})
    node = ensure_node_model()
    with tempfile.TemporaryDirectory(prefix="fastport-bench-") as tmp:
        servers: list[ServerProcess] = []
        try:
            start(Path(tmp), node, servers)
            warm_up(servers, mode)
            results = rotating_rounds(servers, scenarios, mode, 1 if args.quick else 3, extra=extra)
        finally:
            for server in servers:
                server.stop()
    names = (servers[0].name, servers[1].name, servers[2].name)
    print("\n" + three_way_table(results, names, labels, scenarios) + "\n", flush=True)


def results_markdown(
    results: list[Measurement], meta: dict[str, Any], scenarios: tuple[Scenario, ...]
) -> str:
    lines = [
        f"Measured {meta['date']} ({meta['mode']} mode, commit {meta['commit']}): {meta['cpu']}, "
        f"{meta['cpus']} CPUs; Python {meta['python']}, Node {meta['node']} with ws {meta['ws']}. "
        f"Servers pinned to CPU {SERVER_CPU}, load generator to CPU {LOAD_CPU}. Each cell is the median of "
        f"the runs made (ratios: median of per-pair ratios, min{DASH}max in brackets).",
        "",
        "**Under load** (window of 100 unconfirmed publishes, 256-byte plaintext payloads):",
        "",
        "| scenario | server | messages/s | deliveries/s | p50 latency | p99 latency "
        "| server CPU µs / message | µs / delivery | server CPU busy | load-gen CPU µs / delivery | runs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in scenarios:
        if scenario.trickle:
            continue
        for server in ("fastport", "node"):
            ms = _ok(results, scenario.key, server)
            name = "fastport" if server == "fastport" else "Node model"
            lines.append(
                f"| {scenario.label} | {name} | {_fmt(_median([m.msg_per_s for m in ms]))} "
                f"| {_fmt(_median([m.deliveries_per_s for m in ms]))} "
                f"| {_fmt(_median([m.latency_us['p50'] for m in ms]))} µs "
                f"| {_fmt(_median([m.latency_us['p99'] for m in ms]))} µs "
                f"| {_fmt(_median([m.us_per_message for m in ms]), 1)} "
                f"| {_fmt(_median([m.us_per_delivery for m in ms]), 1)} "
                f"| {_fmt(_median([m.server_busy * 100 for m in ms]))} % "
                f"| {_fmt(_median([m.loadgen_us_per_message / m.subscribers for m in ms]), 1)} | {len(ms)} |"
            )
    lines += [
        "",
        "**fastport / Node model ratios** (below 1: fastport cheaper or faster; the issue's target is a "
        "server CPU ratio ≤ 1.0):",
        "",
        "| scenario | server CPU per message | per delivery | messages/s | p50 latency | p99 latency |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in scenarios:
        pairs = _pairs(results, scenario.key)
        lines.append(
            f"| {scenario.label} | {_ratio_cell([f.us_per_message / n.us_per_message for f, n in pairs])} "
            f"| {_ratio_cell([f.us_per_delivery / n.us_per_delivery for f, n in pairs])} "
            f"| {_ratio_cell([f.msg_per_s / n.msg_per_s for f, n in pairs])} "
            f"| {_ratio_cell([f.latency_us['p50'] / n.latency_us['p50'] for f, n in pairs])} "
            f"| {_ratio_cell([f.latency_us['p99'] / n.latency_us['p99'] for f, n in pairs])} |"
        )
    lines += [
        "",
        "**Trickling traffic**: server CPU per message when traffic is sparse (a window of 1 is one "
        "publish per round trip; paced rows send one publish every 1/rate s). Less traffic per wake-up means "
        "less to amortise the per-read and per-write costs over:",
        "",
        "| load | fastport µs / message | µs / delivery | Node model µs / message | µs / delivery "
        "| ratio | fastport p50 | Node p50 | messages/s (fastport, Node) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in sorted(scenarios, key=lambda s: (s.subscribers, -s.window if not s.rate else 0, -s.rate)):
        fp, nd = _ok(results, scenario.key, "fastport"), _ok(results, scenario.key, "node")
        pairs = _pairs(results, scenario.key)
        lines.append(
            f"| {scenario.label} | {_fmt(_median([m.us_per_message for m in fp]), 1)} "
            f"| {_fmt(_median([m.us_per_delivery for m in fp]), 1)} "
            f"| {_fmt(_median([m.us_per_message for m in nd]), 1)} "
            f"| {_fmt(_median([m.us_per_delivery for m in nd]), 1)} "
            f"| {_ratio_cell([f.us_per_message / n.us_per_message for f, n in pairs])} "
            f"| {_fmt(_median([m.latency_us['p50'] for m in fp]))} µs "
            f"| {_fmt(_median([m.latency_us['p50'] for m in nd]))} µs "
            f"| {_fmt(_median([m.msg_per_s for m in fp]))}, {_fmt(_median([m.msg_per_s for m in nd]))} |"
        )
    failed = [m for m in results if not m.ok]
    lines += [
        "",
        (
            f"{len(failed)} run(s) failed or were incomplete and are left out: "
            + "; ".join(f"{m.server} {m.scenario}: {m.problem}" for m in failed)
            if failed
            else "Every run delivered every message to every subscriber, each ACKed"
        )
        + f"; server retries (a message received twice): {sum(m.redeliveries for m in results)}.",
    ]
    return "\n".join(lines)


def replace_section(name: str, body: str) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` (appended if absent)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + f"\n\n{block}\n"
    DOC.write_text(text)


# -- the core benchmark, and the profile -----------------------------------------------------------------


def core_bench(quick: bool) -> str:
    """``benchmarks/core_bench.py``'s table (the server core in memory), run on the servers' CPU."""
    args = ["--messages", "4000", "--rounds", "1"] if quick else []
    completed = subprocess.run(
        [PYTHON, str(BENCH / "core_bench.py"), *args], cwd=ROOT, check=True, capture_output=True, text=True,
        preexec_fn=_pin(SERVER_CPU),
    )  # fmt: skip
    table = completed.stdout.strip()
    return (
        f"`benchmarks/core_bench.py{' ' + ' '.join(args) if args else ''}` (best of its rounds, "
        f"process CPU time, CPU {SERVER_CPU}), measured in the same run:\n\n{table}"
    )


_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_key(frame: str) -> tuple[str, str]:
    """(function, short file) of one py-spy frame ``function (path:line)``."""
    match = _FRAME.match(frame)
    if match is None:
        return frame, "?"
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return match["function"], path


def _layer(file: str) -> str:
    """The layer a source file belongs to, for the self-time-by-layer summary."""
    layers = (
        ("fastport_core/frames.py", "WebSocket frame codec (fastport_core.frames)"),
        ("fastport_core/websocket.py", "WebSocket endpoint (fastport_core.websocket)"),
        ("fastport_core/protocol.py", "JSON parse/encode (fastport_core.protocol)"),
        ("fastport_core/broker.py", "broker (routing, deliveries, ACKs)"),
        ("fastport_core/dedupe.py", "broker (routing, deliveries, ACKs)"),
        ("fastport_core/metrics.py", "metrics counters"),
        ("fastport_core/timers.py", "core glue (server.py, timers)"),
        ("fastport_core/server.py", "core glue (server.py, timers)"),
        ("fastport_anyio/", "anyio adapter (fastport_anyio.server)"),
        ("anyio/", "anyio streams, events, cancel scopes"),
        ("asyncio/", "asyncio event loop"),
        ("selectors.py", "asyncio event loop"),
        ("<string>", "generated code (protocol validators, dataclass __init__)"),
    )
    for prefix, layer in layers:
        if file.startswith(prefix):
            return layer
    return f"other ({file})"


_SETUP_FRAMES: Final = frozenset(
    {"_receive_http", "_upgrade", "_on_init", "connection_lost", "_close", "_accept_loop", "shutdown"}
)
"""Functions of a connection's set-up and teardown (HTTP upgrade, scrypt, close): outside the measured
interval, so samples under them are left out of a per-message profile."""

_CORE_BENCH_SETUP: Final = frozenset({"_client_frame", "_connect", "run.<locals>.<genexpr>"})
"""Frames of ``core_bench.run`` that build its input before the timed loop."""

Frame = tuple[str, str]
"""(function, short file) of one py-spy frame."""


def _is_syscall(function: str, file: str) -> bool:
    """Leaf functions whose self time is a system call: the event loop's ``epoll_wait``, the adapter's
    direct ``os.write``, asyncio's ``recv``. Their samples are mostly time the thread, runnable again
    after the call, waited for its CPU; their CPU is kernel time (stime)."""
    return (
        (file == "selectors.py" and function.endswith("select"))
        or (file.startswith("fastport_anyio/") and "_direct_send" in function)
        or function.endswith("_read_ready__data_received")
    )


def _aggregate(raw: Path, keep: Callable[[list[Frame]], bool]) -> tuple[Counter[Frame], Counter[Frame], int]:
    """Self and inclusive sample counts per function of a ``py-spy --format raw`` file, over the stacks
    ``keep`` accepts, and their total."""
    self_time: Counter[Frame] = Counter()
    inclusive: Counter[Frame] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = [_frame_key(frame) for frame in stack.split(";")]
        frames = [f for f in frames if not f[0].startswith(("process ", "thread "))]
        if not frames or not keep(frames):
            continue
        samples = int(number)
        total += samples
        self_time[frames[-1]] += samples
        for key in set(frames):
            inclusive[key] += samples
    return self_time, inclusive, total


def _tables(
    self_time: Counter[Frame],
    inclusive: Counter[Frame],
    us_per_sample: float,
    unit: str,
    top: int,
    kernel_us: float | None = None,
) -> list[str]:
    """The layer table and the top-functions table, in µs per ``unit``.

    ``kernel_us``: the kernel's CPU per unit (stime), shown as its own layer; the samples of system-call
    leaves are then left out of the tables (their time is that row).
    """
    by_layer: Counter[str] = Counter()
    for (_, file), samples in self_time.items():
        by_layer[_layer(file)] += samples
    rows = [(layer, n * us_per_sample) for layer, n in by_layer.most_common()]
    if kernel_us is not None:
        rows = sorted([*rows, ("kernel: system calls (stime)", kernel_us)], key=lambda row: -row[1])
    total_us = sum(us for _, us in rows)
    return [
        f"| layer (self time) | µs / {unit} | share |",
        "| --- | ---: | ---: |",
        *(f"| {layer} | {us:.1f} | {us / total_us:.0%} |" for layer, us in rows if us / total_us >= 0.002),
        "",
        f"| function (self time) | file | µs / {unit} | inclusive µs / {unit} |",
        "| --- | --- | ---: | ---: |",
        *(
            f"| `{function}` | {file} | {n * us_per_sample:.2f} "
            f"| {inclusive[function, file] * us_per_sample:.1f} |"
            for (function, file), n in self_time.most_common(top)
        ),
    ]


def summarise_profile(raw: Path, measured: Measurement, unit: str, top: int = 18) -> str:
    """Where the server's CPU went in one profiled measurement, in µs per ``unit``.

    py-spy samples a thread whenever it is runnable: it skips one asleep in ``epoll_wait`` but cannot
    tell running from waiting for the CPU, and on this shared machine the server waits a lot (schedstat's
    run-queue delay), most of it right after a system call. So sample counts are not CPU time. What is:
    utime and stime from ``/proc/<pid>/stat``. The kernel's part (stime: the system calls, and the
    loopback TCP work done in them) is one row; the samples whose leaf is a system call (``epoll_wait``,
    the adapter's ``os.write``, asyncio's ``recv``) are left out, and the remaining samples, the server's
    own Python code, share the user time (utime) in proportion. Time in C code that is not a system call
    (orjson, ``int.from_bytes``) counts as self time of the Python function that called it.
    """

    def measured_work(frames: list[Frame]) -> bool:
        """The event loop's thread (helper threads, e.g. an idle executor's, start in threading.py),
        outside connection set-up and teardown."""
        return frames[0][1] != "threading.py" and not any(
            function.rpartition(".")[2] in _SETUP_FRAMES for function, _ in frames
        )

    _, _, all_samples = _aggregate(raw, measured_work)
    self_time, inclusive, python_samples = _aggregate(
        raw, lambda frames: measured_work(frames) and not _is_syscall(*frames[-1])
    )
    syscall_samples = all_samples - python_samples
    if not python_samples:
        return "(no samples)"
    units = measured.deliveries if unit == "delivery" else measured.count
    cpu_us = measured.server_cpu_s * 1e6 / units
    kernel_us = cpu_us * measured.server_system_share
    header = (
        f"Server CPU {cpu_us:.1f} µs / {unit} under the profiler ({measured.msg_per_s:,.0f} msg/s): "
        f"{cpu_us - kernel_us:.1f} in its own code (utime), {kernel_us:.1f} in the kernel (stime). "
        f"{python_samples:,} samples of Python code share the user time; {syscall_samples:,} samples in "
        f"system calls are left out (the server waited {measured.server_wait_s:.2f} s for CPU {SERVER_CPU} "
        f"while it used {measured.server_cpu_s:.2f} s, and that waiting is sampled too)."
    )
    us_per_sample = (cpu_us - kernel_us) / python_samples
    return "\n".join([header, "", *_tables(self_time, inclusive, us_per_sample, unit, top, kernel_us)])


def profile_core(py_spy: str, workdir: Path, subscribers: int, messages: int) -> str:
    """py-spy on ``core_bench.run`` (the server core in memory, batches of 100): the core's own costs.

    No sockets, no event loop, no system calls: whatever waiting the machine imposes falls on the work in
    proportion to it, so each function's share of the samples times the µs per message measured under
    the profiler (which stops the process ~1000 times a second, so a little above the unprofiled figure)
    is its cost. This is the clean view of the core that the server profiles below cannot give.
    """
    raw = workdir / f"profile-core-{subscribers}.txt"
    program = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); import core_bench; "
        f"print('us_per_message', min(core_bench.run({subscribers}, {messages}, 100) for _ in range(3)))"
    )
    # py-spy on the load generator's CPU, the benchmark (taskset execs it: same pid) on the servers' CPU
    pin_child = ["taskset", "-c", str(SERVER_CPU)] if shutil.which("taskset") else []
    completed = subprocess.run(
        [py_spy, "record", "--rate", str(PROFILE_RATE), "--format", "raw", "--nolineno",
         "--output", str(raw), "--", *pin_child, PYTHON, "-c", program],
        cwd=ROOT, check=True, capture_output=True, text=True,
        preexec_fn=_pin(LOAD_CPU),
    )  # fmt: skip
    # py-spy writes its own lines to stdout too
    us_per_message = next(
        float(line.split()[1]) for line in completed.stdout.splitlines() if line.startswith("us_per_message ")
    )

    def keep(frames: list[Frame]) -> bool:
        return any(
            function == "run" and file.endswith("core_bench.py") for function, file in frames
        ) and not any(function in _CORE_BENCH_SETUP for function, _ in frames)

    self_time, inclusive, total = _aggregate(raw, keep)
    if not total:
        return "(no samples)"
    fan_out = subscribers > 1
    unit = "delivery" if fan_out else "message"
    us_per_unit = us_per_message / subscribers
    header = (
        f"`core_bench.run({subscribers}, {messages}, batch=100)`: {us_per_unit:.1f} µs / {unit} "
        f"(best of 3, process CPU); {total:,} samples of its timed loop, scaled to that figure."
    )
    shutil.copy(raw, RESULTS_DIR / raw.name)
    return "\n".join([header, "", *_tables(self_time, inclusive, us_per_unit / total, unit, 20)])


@contextlib.contextmanager
def _attached(command: list[str], settle: float) -> Iterator[None]:
    """Run a tool that attaches to the server (py-spy, strace) for the duration of the block, on the
    load generator's CPU; SIGINT makes both write their output."""
    tool = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=_pin(LOAD_CPU),  # noqa: PLW1509 - the driver has one thread
    )  # fmt: skip
    try:
        time.sleep(settle)  # it attaches
        yield
    finally:
        tool.send_signal(signal.SIGINT)
        try:
            tool.wait(30)
        except subprocess.TimeoutExpired:
            tool.kill()
            tool.wait()


def _sampled(py_spy: str, server: ServerProcess, scenario: Scenario, mode: Mode, raw: Path) -> Measurement:
    """One measurement with py-spy attached to the server for its interval."""
    command = [
        py_spy, "record", "--pid", str(server.pid), "--rate", str(PROFILE_RATE), "--format", "raw",
        "--nolineno", "--output", str(raw),
    ]  # fmt: skip
    return measure(server, scenario, mode, 0, around=lambda: _attached(command, 1.0))


def count_syscalls(
    strace: str, server: ServerProcess, scenario: Scenario, mode: Mode, out: Path
) -> Counter[str]:
    """System calls per message (all threads) during one measurement, from ``strace -c -f``.

    strace slows the server down several times, so only the counts are used, never the times.
    """
    command = [strace, "-c", "-f", "-o", str(out), "-p", str(server.pid)]
    one = measure(server, scenario, mode, 0, around=lambda: _attached(command, 0.5))
    counts: Counter[str] = Counter()
    if not one.ok or not out.exists():
        return counts
    for line in out.read_text().splitlines():
        fields = line.split()
        if (
            len(fields) in {5, 6}
            and fields[-1].isidentifier()
            and fields[-1] != "total"
            and fields[3].isdigit()
        ):
            counts[fields[-1]] = int(fields[3])
    return Counter({name: n / one.count for name, n in counts.items()})


SYSCALL_SCENARIOS: Final = ("1to1_w100", "1to50_w100", "1to1_w1", "1to50_w1")


def profile(workdir: Path, mode: Mode, backend: str, node: str) -> str:
    """Where the time goes: the core in memory, the whole server under load, and system calls.

    1. py-spy on ``core_bench.run`` (:func:`profile_core`): the core's own costs, undistorted.
    2. py-spy attached to a fresh, warmed-up fastport server (py-spy pinned to the load generator's CPU)
       for one measurement of each main scenario and of the sparsest windows, repeated
       :data:`PROFILE_ATTEMPTS` times (once in quick mode); the attempt kept is the one in which the
       server waited least for its CPU relative to the CPU it used, as waiting is sampled like work (see
       :func:`summarise_profile`). py-spy stops the server for each sample (its default): its
       ``--nonblocking`` mode was tried and drops most samples taken while Python code runs (an
       inconsistent stack), which leaves the profile full of system calls.
    3. ``strace -c`` on both servers (when strace is installed): system calls per message, exact counts.
    """
    py_spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(py_spy).exists():
        return "py-spy is not installed: `.venv/bin/pip install py-spy`, then run with `--profile` again."
    sections = ["### The core in memory (no I/O)"]
    core_messages = 4000 if mode is QUICK else 20_000
    for subscribers in (1, 50):
        messages = core_messages if subscribers == 1 else core_messages // 25
        sections.append(profile_core(py_spy, workdir, subscribers, messages))
    sections.append(f"### The whole server under load (fastport on {backend})")
    attempts = 1 if mode is QUICK else PROFILE_ATTEMPTS
    for scenario in (*MAIN, *(s for s in TRICKLE if s.key in {"1to1_w1", "1to50_w1"})):
        best: tuple[float, Measurement, Path] | None = None
        server = start_fastport(workdir, backend)
        try:
            measure(server, scenario, Mode(mode.scale * 0.3, 1, 1, mode.cap), -1)  # warm-up
            for attempt in range(attempts):
                raw = workdir / f"profile-{scenario.key}-{attempt}.txt"
                one = _sampled(py_spy, server, scenario, mode, raw)
                _print_measurement(one)
                noise = one.server_wait_s / one.server_cpu_s if one.server_cpu_s else math.inf
                if one.ok and raw.exists() and (best is None or noise < best[0]):
                    best = (noise, one, raw)
        finally:
            server.stop()
        if best is None:
            sections.append(f"#### {scenario.label}\n\nevery profiled run failed")
            continue
        _, one, raw = best
        fan_out = scenario.subscribers > 1
        summary = summarise_profile(raw, one, "delivery" if fan_out else "message")
        sections.append(f"#### {scenario.label}\n\n{summary}")
        shutil.copy(raw, RESULTS_DIR / f"profile-{scenario.key}.txt")
    strace = shutil.which("strace")
    if strace is not None:
        sections.append(
            "### System calls per message (`strace -c -f`, both servers)\n\n"
            + syscall_table(strace, workdir, mode, backend, node)
        )
    return "\n\n".join(sections)


def syscall_table(strace: str, workdir: Path, mode: Mode, backend: str, node: str) -> str:
    """Exact system-call counts per message of both servers under the same load."""
    lines = [
        "| scenario | server | syscalls / message | per delivery | the most frequent, per message |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    light = Mode(mode.scale * 0.25, 1, 1, mode.cap)  # strace slows the servers: fewer messages
    for key in SYSCALL_SCENARIOS:
        scenario = next(s for s in (*MAIN, *TRICKLE) if s.key == key)
        for name in ("fastport", "node"):
            server = start_fastport(workdir, backend) if name == "fastport" else start_node(node, workdir)
            try:
                measure(server, scenario, Mode(mode.scale * 0.1, 1, 1, mode.cap), -1)  # warm-up
                counts = count_syscalls(strace, server, scenario, light, workdir / f"strace-{name}-{key}.txt")
            finally:
                server.stop()
            total = sum(counts.values())
            common = ", ".join(f"{call} {n:.2f}" for call, n in counts.most_common(5))
            label = "fastport" if name == "fastport" else "Node model"
            per_delivery = total / scenario.subscribers
            lines.append(f"| {scenario.label} | {label} | {total:.2f} | {per_delivery:.2f} | {common} |")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------------


def _loadavg() -> list[str] | None:
    """The 1/5/15-minute load averages: how busy the shared machine was (2.0 = both CPUs full)."""
    with contextlib.suppress(OSError):
        return Path("/proc/loadavg").read_text().split()[:3]
    return None


def _meta(mode_name: str, node: str, backend: str) -> dict[str, Any]:
    def output(*command: str) -> str:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            return subprocess.run(
                command, capture_output=True, text=True, check=True, cwd=ROOT
            ).stdout.strip()
        return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ws_package = NODE_DIR / "node_modules" / "ws" / "package.json"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": mode_name,
        "backend": backend,
        "commit": output("git", "rev-parse", "--short", "HEAD")
        + (" + uncommitted server changes" if output("git", "status", "--porcelain", *SERVER_CODE) else ""),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "node": output(node, "--version"),
        "ws": orjson.loads(ws_package.read_bytes())["version"] if ws_package.exists() else "?",
        "loadavg_before": _loadavg(),
    }


@contextlib.contextmanager
def _servers(workdir: Path, node: str, backend: str) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        started.append(start_fastport(workdir, backend))
        started.append(start_node(node, workdir))
        yield started
    finally:
        for server in started:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one repetition (~40 s)")
    parser.add_argument("--profile", action="store_true", help="then profile the fastport server (py-spy)")
    parser.add_argument("--profile-only", action="store_true", help="only the profile, no comparison")
    parser.add_argument(
        "--backend", choices=("asyncio", "uvloop", "trio"), default="asyncio",
        help="fastport's loop (uvloop: asyncio with uvloop's loop, if installed)",
    )  # fmt: skip
    parser.add_argument("--only", help="comma-separated scenario keys (e.g. 1to1_w100,1to50_w1)")
    parser.add_argument("--no-doc", action="store_true", help="leave docs/performance.md unchanged")
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    # Quick runs are for trying the harness: their small counts do not belong in the document.
    write_doc = not (args.no_doc or args.quick or args.only)
    scenarios = tuple(s for s in (*MAIN, *TRICKLE) if not args.only or s.key in args.only.split(","))
    if os.cpu_count() != 2:
        print(f"note: {os.cpu_count()} CPUs; the servers still go on CPU 0 and the load on CPU 1", flush=True)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {LOAD_CPU})
    RESULTS_DIR.mkdir(exist_ok=True)
    node = ensure_node_model()
    meta = _meta("quick" if args.quick else "full", node, args.backend)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    started = time.monotonic()
    report: dict[str, Any] = {"meta": meta}
    with tempfile.TemporaryDirectory(prefix="fastport-bench-") as tmp:
        workdir = Path(tmp)
        if not args.profile_only:
            with _servers(workdir, node, args.backend) as servers:
                warm_up(servers, mode)
                results = run_all(servers, mode, scenarios)
            report["measurements"] = [asdict(m) for m in results]
            meta["loadavg_after"] = _loadavg()
            table = results_markdown(results, meta, scenarios)
            print("\n" + table + "\n", flush=True)
            core = core_bench(args.quick)
            print(core + "\n", flush=True)
            if write_doc:
                replace_section("RESULTS", table)
                replace_section("CORE", core)
        if args.profile or args.profile_only:
            summary = profile(workdir, mode, args.backend, node)
            report["profile"] = summary
            print("\n" + summary + "\n", flush=True)
            if write_doc:
                replace_section(
                    "PROFILE",
                    f"Measured {meta['date']} (commit {meta['commit']}, fastport on {args.backend})."
                    f"\n\n{summary}",
                )
    out = RESULTS_DIR / f"load-{stamp}.json"
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"raw results: {out.relative_to(ROOT)}; total {time.monotonic() - started:.0f} s", flush=True)
    if not write_doc:
        print("docs/performance.md left unchanged (quick, --only or --no-doc run)", flush=True)


if __name__ == "__main__":
    main()
