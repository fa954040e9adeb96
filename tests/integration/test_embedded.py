"""The embedded servers: a server orphaned by a crashed launcher is found and replaced,
and the launcher's children do not outlive it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import nats
import psutil
import pytest

from infra.embedded import EmbeddedNats, EmbeddedPostgres, free_port, port_in_use
from shared.settings import PROJECT_ROOT

pytestmark = pytest.mark.integration


async def test_orphaned_nats_server_is_stopped_at_the_next_start(tmp_path: Path):
    port = free_port()
    crashed_launchers_server = EmbeddedNats(tmp_path, port)
    crashed_launchers_server.start()
    # The launcher "crashes": its EmbeddedNats object is gone, the server still runs.
    replacement = EmbeddedNats(tmp_path, port)
    try:
        replacement.start()

        assert crashed_launchers_server.process.wait(5) is not None  # the orphan was stopped
        assert int(replacement.pid_file.read_text()) == replacement.process.pid
        nc = await nats.connect(replacement.url)
        assert (await nc.jetstream().account_info()).streams == 0
        await nc.close()
    finally:
        replacement.stop()
    assert not port_in_use(port)


async def test_orphaned_postgres_is_stopped_and_the_data_kept(tmp_path: Path):
    port = free_port()
    first = EmbeddedPostgres(tmp_path / "data", port)
    url = first.start()
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (7)")
    first_start = await conn.fetchval("SELECT pg_postmaster_start_time()")
    await conn.close()
    second = EmbeddedPostgres(tmp_path / "data", port)  # the launcher crashed and came back
    try:
        second.start()

        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT id FROM kept") == 7
        assert await conn.fetchval("SELECT pg_postmaster_start_time()") > first_start  # a new server
        await conn.close()
    finally:
        second.stop()
    assert not port_in_use(port)


async def test_a_stale_postgres_lock_naming_another_process_is_cleared_not_obeyed(tmp_path: Path):
    port = free_port()
    server = EmbeddedPostgres(tmp_path / "data", port)
    server.start()
    server.stop()
    # After a reboot, postmaster.pid can name a PID that now belongs to someone else: here,
    # this test process. Stopping "the orphan" would signal us; starting must not.
    lock_file = tmp_path / "data" / "postmaster.pid"
    lock_file.write_text(f"{os.getpid()}\n{tmp_path / 'data'}\n")
    try:
        url = server.start()
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
    finally:
        server.stop()


def test_children_die_with_a_launcher_killed_outright():
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT
    )
    child = psutil.Process(int(launcher.stdout.readline()))
    assert child.is_running()

    launcher.kill()  # SIGKILL: no chance to clean up
    launcher.wait()

    child.wait(timeout=5)  # raises psutil.TimeoutExpired if the child outlives its launcher


LAUNCHER = """
import os, subprocess, time
from infra.embedded import die_with
child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with(os.getpid()))
print(child.pid, flush=True)
time.sleep(60)
"""
