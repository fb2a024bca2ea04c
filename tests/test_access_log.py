"""The access log when stdout is not read: a log collector that stalls or dies fills the pipe,
and the gateway must go on answering, hold a bounded amount, and say what it dropped.

The pipes are real (`os.pipe`, and a `gateway run` subprocess whose stdout nobody reads), and
so is the time: the pipe takes 64 KiB and then blocks every write to it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.telemetry.logs import FLUSH_BYTES, MAX_UNWRITTEN_BYTES, AccessLog
from tests.conftest import KeyPair, base_config, free_port, write_config
from tests.test_cli import DEADLINE_SECONDS, answers_200, cli_env, gateway_argv, request, wait_for

# A request id is logged whole (up to 128 characters): long ones make fewer requests fill the
# writer's bound.
LONG_ID = "r" * 100
PADDING = "/" + "p" * 200


def read_all(fd: int, into: bytearray) -> threading.Thread:
    """Read `fd` until EOF on a thread of its own, into `into`."""

    def drain() -> None:
        while chunk := os.read(fd, 65536):
            into.extend(chunk)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    return thread


async def test_past_the_bound_lines_are_dropped_and_counted_and_the_rest_arrive_whole() -> None:
    """20,000 lines (7 MB) into a pipe nobody reads: no write waits on the pipe, what is dropped
    is counted, and once the pipe is read the lines kept arrive whole and in order."""
    read_fd, write_fd = os.pipe()
    dropped: list[int] = []
    received = bytearray()
    total, slowest = 20_000, 0.0
    with os.fdopen(write_fd, "wb") as sink:
        access_log = AccessLog(sink)
        access_log.observe(dropped.append)
        access_log.start()
        try:
            for n in range(total):
                started = time.perf_counter()
                access_log.write({"request_id": f"{LONG_ID}-{n}", "path": PADDING, "n": n})
                slowest = max(slowest, time.perf_counter() - started)
        finally:  # read, or the writer's thread stays blocked on the full pipe
            reader = read_all(read_fd, received)
            await access_log.close()
    reader.join(DEADLINE_SECONDS)
    os.close(read_fd)
    # The pipe took 64 KiB long ago: a write that waited on it would never have returned.
    assert slowest < 0.5
    assert sum(dropped) > 0
    kept = [json.loads(line)["n"] for line in received.splitlines()]
    assert len(kept) + sum(dropped) == total
    assert kept == sorted(kept)
    # What was kept is what the writer's bound holds, to within a batch (one that would not fit
    # is dropped whole).
    assert len(received) > MAX_UNWRITTEN_BYTES - 2 * FLUSH_BYTES


def test_a_gateway_whose_stdout_nobody_reads_answers_every_request(
    tmp_path: Path, key_a: KeyPair
) -> None:
    """`gateway run` with stdout a pipe that is never read, 12,000 refused requests (each a
    ~450-byte access-log line: past the pipe's 64 KiB and the writer's 4 MiB). Every request is
    answered within a second, the dropped lines are counted in /metrics, and what reaches stdout
    once it is read is whole JSON lines."""
    public_port, admin_port = free_port(), free_port()
    config = base_config("http://127.0.0.1:9")  # nothing is forwarded: every request is a 404
    config["listen"] = f"127.0.0.1:{public_port}"
    config["admin_listen"] = f"127.0.0.1:{admin_port}"
    path = write_config(tmp_path, config, {"a.pem": key_a})
    with (tmp_path / "gateway.stderr").open("wb") as stderr:
        gateway = subprocess.Popen(
            gateway_argv("run", "-c", str(path)),
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        wait_for("/readyz answers 200", lambda: answers_200(admin_port, "/readyz"))
        total, clients = 12_000, 4

        def send(client: int) -> list[float]:
            connection = http.client.HTTPConnection("127.0.0.1", public_port, timeout=5)
            took = []
            try:
                for n in range(total // clients):
                    started = time.perf_counter()
                    connection.request("GET", "/nothing", headers={"X-Request-Id": LONG_ID})
                    response = connection.getresponse()
                    response.read()
                    took.append(time.perf_counter() - started)
                    assert response.status == 404, (client, n, response.status)
            finally:
                connection.close()
            return took

        with ThreadPoolExecutor(clients) as pool:
            durations = [d for took in pool.map(send, range(clients)) for d in took]
        assert len(durations) == total
        assert max(durations) < 1.0
        status, body = request(admin_port, "GET", "/metrics")
        assert status == 200
        dropped = next(
            float(line.split()[-1])
            for line in body.decode().splitlines()
            if line.startswith("gateway_access_log_dropped_lines_total ")
        )
        assert 0 < dropped < total
        gateway.send_signal(signal.SIGTERM)
        out, _ = gateway.communicate(timeout=DEADLINE_SECONDS)
        assert gateway.returncode == 0
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.communicate(timeout=DEADLINE_SECONDS)
    records = [json.loads(line) for line in out.splitlines()]
    assert records
    assert all(r["request_id"] == LONG_ID and r["status"] == 404 for r in records)
    assert len(records) + dropped <= total
