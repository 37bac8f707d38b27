"""Castor: background tasks for small Python apps, on one beaver-db file.

Decorate a function, call ``.delay()``, wait on the handle, and run a worker
with ``castor main:manager``. The application and the workers talk only
through the SQLite file of a beaver-db database: no Redis, no broker. Castor
needs only the standard library and beaver-db, and this file can be copied
into a project as it is.

    from beaver import BeaverDB
    from castor import Manager
    manager = Manager(BeaverDB("tasks.db"))
    @manager.task(mode="thread")
    def send_email(to): ...
    send_email.delay("alice@example.com").join(timeout=5)

Licence: MIT.
"""

__version__ = "0.1.0"
__author__ = "The castor developers"
__license__ = "MIT"

__all__ = [
    "CastorError",
    "Manager",
    "NotJSONError",
    "Task",
    "TaskError",
    "TaskHandle",
    "UnknownTaskError",
    "Worker",
    "main",
]

import argparse
import asyncio
import atexit
import builtins
import collections
import contextlib
import ctypes
import datetime
import functools
import importlib
import inspect
import json
import logging
import math
import os
import queue
import random
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import termios
import threading
import time
import traceback
import unicodedata
import uuid

if __name__ == "__main__":
    # Running this file as a script must not import it a second time when the
    # user's module says ``from castor import Manager``.
    sys.modules.setdefault("castor", sys.modules["__main__"])


# Logger and constants #########################################################

logger = logging.getLogger("castor")
logger.addHandler(logging.NullHandler())

#: Statuses a task can be in; the last three are final.
STATUSES = ("pending", "running", "success", "failed", "cancelled")

#: Statuses after which a task never changes again.
FINISHED = frozenset(("success", "failed", "cancelled"))

#: Execution modes a task must choose between.
MODES = ("thread", "process")

#: The beaver dict that holds the task documents.
DICT_NAME = "castor_tasks"

#: Seconds between a worker's heartbeats.
HEARTBEAT_INTERVAL = 1.0

#: A worker silent for this long is dead and its tasks go back to pending.
LEASE_TIMEOUT = 10.0

#: Seconds between two sweeps for tasks held by dead workers.
REAP_INTERVAL = 2.0

#: A task whose worker died this many times fails instead of running again.
MAX_LOSSES = 3

#: The longest delay, timeout or period castor accepts (about 31 years).
MAX_SECONDS = 1e9

#: While a backlog drains, how long a worker waits for more running tasks to
#: finish so that one commit records them all (group commit).
GROUP_COMMIT_WINDOW = 0.001

#: The CLI writes its log lines at most this many seconds after the event.
LOG_FLUSH_INTERVAL = 0.05

#: Where inotify is missing, how often an idle worker looks for new work.
IDLE_POLL = 0.002

#: SQLite busy timeout: a file write-locked by someone else is waited for.
BUSY_TIMEOUT = 60.0

#: Seconds a new process-pool child may take to import the user's modules.
CHILD_START_TIMEOUT = 120.0


# Exceptions ###################################################################


class CastorError(Exception):
    """Base class of every error castor raises itself."""


class TaskError(CastorError):
    """A task failed with an exception that cannot be rebuilt here."""

    def __init__(self, message, type_name=None, traceback=None):
        super().__init__(message)
        self.type_name = type_name
        self.traceback = traceback


class NotJSONError(CastorError, TypeError):
    """An argument or result is not JSON."""


class UnknownTaskError(CastorError, KeyError):
    """No task with this id is in the store."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class _UsageError(CastorError):
    """A command-line mistake: reported in one line, exit status 2."""


# Public API: Manager ##########################################################


class Manager:
    """Holds the beaver-db file and the registry of tasks.

    ``Manager(db, immediate=True)`` runs tasks inline at ``.delay()``, for
    testing an application without a worker.
    """

    def __init__(self, db, *, immediate=False):
        self.db = db
        self.immediate = bool(immediate)
        self.path = _db_path(db)
        self._store = _Store(self.path)
        self._tasks = {}

    def __repr__(self):
        return f"<castor.Manager {self.path!r} tasks={len(self._tasks)}>"

    def task(self, mode, *, daemon=False, retries=0, retry_delay=1.0,
             timeout=None, priority=0, every=None):
        """Decorator: register a function as a background task."""
        options = _task_options(mode, daemon, retries, retry_delay, timeout,
                                priority, every)

        def decorator(func):
            if not callable(func):
                raise TypeError(f"@manager.task decorates functions, not {func!r}")
            task = Task(self, func, **options)
            if task.every is not None:
                _check_no_arguments(func)
            self._tasks[task.name] = task
            return task
        return decorator

    def get_task_by_id(self, task_id):
        """The handle of an existing task, or None for an unknown id."""
        if not isinstance(task_id, str):
            return None
        doc = self._store.get_doc(task_id)
        return None if doc is None else TaskHandle(self, task_id, doc["task_name"])

    def tasks(self, status=None, limit=50):
        """Task documents, newest first, optionally of one status."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        return self._store.list_docs(status, int(limit))

    def counts(self):
        """``{"pending": n, "running": n, "success": n, ...}`` without a scan."""
        return self._store.counts()

    def prune(self, older_than):
        """Delete finished tasks older than ``older_than`` seconds; return how many."""
        seconds = _seconds(older_than, "older_than")
        return self._store.prune(time.time() - seconds)

    @property
    def registry(self):
        """Registered tasks by name (a copy)."""
        return dict(self._tasks)


# Public API: Task #############################################################


class Task:
    """A registered function. Call it to run it here; ``.delay()`` to queue it."""

    def __init__(self, manager, func, *, mode, daemon=False, retries=0,
                 retry_delay=1.0, timeout=None, priority=0, every=None):
        functools.update_wrapper(self, func)
        self.manager = manager
        self.func = func
        self.name = _task_name(func)
        self.mode = mode
        self.daemon = daemon
        self.retries = retries
        self.retry_delay = retry_delay
        self.timeout = timeout
        self.priority = priority
        self.every = every

    def __repr__(self):
        return f"<castor.Task {self.name} mode={self.mode}>"

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)

    def __get__(self, obj, objtype=None):
        # Tasks are plain functions; they never bind to an instance.
        return self

    def delay(self, *args, **kwargs):
        """Queue the task to run now. Returns a TaskHandle."""
        return self.schedule(args, kwargs)

    def schedule(self, args=(), kwargs=None, *, delay=None, at=None, priority=None):
        """Queue the task to run no earlier than ``delay`` seconds or ``at``."""
        now = time.time()
        eta = _eta(now, delay, at)
        prio = self.priority if priority is None else _int(priority, "priority")
        doc = self._document(tuple(args), dict(kwargs or {}), now, eta, prio)
        if self.manager.immediate:
            return self._run_inline(doc)
        self.manager._store.enqueue([doc])
        return TaskHandle(self.manager, doc["id"], self.name)

    def map(self, iterable):
        """Queue one task per item, all in one transaction."""
        if self.manager.immediate:
            return [self.schedule(_as_args(item)) for item in iterable]
        now = time.time()
        stamp = _iso(now)
        docs = [self._document(_as_args(item), {}, now, now, self.priority, stamp)
                for item in iterable]
        self.manager._store.enqueue(docs)
        return [TaskHandle(self.manager, doc["id"], self.name) for doc in docs]

    def _document(self, args, kwargs, now, eta, priority, stamp=None):
        """A new task document; the store checks it is JSON as it writes it."""
        return {
            "id": _new_id(), "task_name": self.name, "status": "pending",
            "args": list(args), "kwargs": kwargs,
            "enqueued_at": stamp or _iso(now), "started_at": None, "finished_at": None,
            "result": None, "error": None, "exception": None,
            "mode": self.mode, "priority": priority,
            "eta": _iso(eta) if eta > now else None, "eta_ts": eta,
            "attempts": 0, "retries": self.retries, "losses": 0, "worker": None,
        }

    def _run_inline(self, doc):
        """Immediate mode: run now, retries included, and store the outcome."""
        # The function sees JSON, as in a worker, and refuses what a worker would.
        doc = json.loads(_to_json(doc, f"the arguments of {self.name}"))
        for attempt in range(1, self.retries + 2):
            started = time.time()
            reply = _execute(self, doc["args"], doc["kwargs"])
            doc.update(attempts=attempt, started_at=_iso(started))
            if reply["ok"]:
                break
        _apply_reply(doc, reply, time.time())
        self.manager._store.put_finished(doc)
        return TaskHandle(self.manager, doc["id"], self.name)


# Public API: TaskHandle #######################################################


class TaskHandle:
    """A queued task: its id, status and result. True once it has finished."""

    __slots__ = ("manager", "id", "name")

    def __init__(self, manager, task_id, name=None):
        self.manager = manager
        self.id = task_id
        self.name = name

    def __repr__(self):
        doc = self.manager._store.get_doc(self.id)
        status = doc["status"] if doc else "unknown"
        return f"<TaskHandle {self.id[:8]} {self.name} {status}>"

    def __eq__(self, other):
        return isinstance(other, TaskHandle) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __bool__(self):
        return self.status() in FINISHED

    def info(self):
        """The task document, as stored."""
        return self._doc()

    def status(self):
        """"pending", "running", "success", "failed" or "cancelled"."""
        return self._doc()["status"]

    def cancel(self):
        """Stop a pending task from ever running. False if it already started."""
        return self.manager._store.cancel(self.id, time.time())

    def join(self, timeout=None):
        """Wait for the result; raise TimeoutError or the task's exception."""
        waiting = self._wait(timeout)
        try:
            while True:
                time.sleep(next(waiting))
        except StopIteration as done:
            return _outcome(done.value)

    async def resolve(self, timeout=None):
        """``join`` for asyncio: waits without blocking the event loop."""
        waiting = self._wait(timeout)
        try:
            while True:
                await asyncio.sleep(next(waiting))
        except StopIteration as done:
            return _outcome(done.value)

    def _doc(self):
        doc = self.manager._store.get_doc(self.id)
        if doc is None:
            raise UnknownTaskError(f"no task {self.id!r} in the store (pruned?)")
        return doc

    def _wait(self, timeout):
        """Yield sleep lengths until the task finishes; return its document.

        The store's data version changes only when another connection
        commits, so most polls cost one pragma and no document read.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        store, seen, pause = self.manager._store, None, 0.0005
        while True:
            version = store.data_version()
            if version != seen:
                seen, doc = version, self._doc()
                if doc["status"] in FINISHED:
                    return doc
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"task {self.id} did not finish within {timeout}s")
            pause = min(pause * 1.2, 0.02)
            yield pause if left is None else min(pause, left)


# Helpers of the public API ####################################################


def _task_options(mode, daemon, retries, retry_delay, timeout, priority, every):
    """Check decorator arguments when the decorator is applied."""
    if callable(mode):
        raise TypeError("@manager.task needs a mode: @manager.task(mode='thread')")
    if mode not in MODES:
        raise ValueError(f"mode must be 'thread' or 'process', not {mode!r}")
    if not isinstance(daemon, bool):
        raise TypeError(f"daemon must be True or False, not {daemon!r}")
    retries = _int(retries, "retries")
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, not {retries}")
    return dict(
        mode=mode, daemon=daemon, retries=retries,
        retry_delay=_seconds(retry_delay, "retry_delay"),
        timeout=None if timeout is None else _positive(timeout, "timeout"),
        priority=_int(priority, "priority"),
        every=None if every is None else _positive(every, "every"),
    )


def _int(value, what):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {value!r}")
    return value


def _seconds(value, what):
    """Seconds as a float from a number or a timedelta, never negative."""
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be seconds (a number or timedelta), not {value!r}")
    if not 0 <= value <= MAX_SECONDS:  # also refuses NaN and infinity
        raise ValueError(f"{what} must be between 0 and {MAX_SECONDS:g} seconds, not {value!r}")
    return float(value)


def _positive(value, what):
    seconds = _seconds(value, what)
    if seconds == 0:
        raise ValueError(f"{what} must be more than 0 seconds")
    return seconds


def _check_no_arguments(func):
    try:
        inspect.signature(func).bind()
    except TypeError:
        raise ValueError(f"a periodic task ({func.__qualname__}) must take no arguments") from None


def _eta(now, delay, at):
    if delay is not None and at is not None:
        raise TypeError("give delay or at, not both")
    if at is not None:
        if not isinstance(at, datetime.datetime) or at.tzinfo is None:
            raise TypeError(f"at must be a timezone-aware datetime, not {at!r}")
        return max(now, at.timestamp())
    return now + (_seconds(delay, "delay") if delay is not None else 0.0)


def _as_args(item):
    """An item of ``.map()``: a tuple is the positional arguments."""
    return item if isinstance(item, tuple) else (item,)


def _task_name(func):
    """``module.qualname``; a script's tasks are named after its file."""
    module = func.__module__
    if module == "__main__":
        module = _main_module_name() or module
    return f"{module}.{func.__qualname__}"


def _main_module_name():
    """What ``python main.py`` would be called if imported: ``main``."""
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", "__mp_main__"):
        return spec.name
    path = getattr(main_module, "__file__", None)
    return os.path.splitext(os.path.basename(path))[0] if path else None


def _db_path(db):
    """The file behind a BeaverDB or AsyncBeaverDB (castor opens it directly)."""
    engine = getattr(db, "_async_db", db)
    path = getattr(engine, "_db_path", None)
    if not isinstance(path, str):
        raise TypeError(f"Manager needs a local beaver.BeaverDB, not {db!r}")
    if path == ":memory:" or path.startswith("file::memory:"):
        raise CastorError("castor needs a database file: an in-memory database "
                          "cannot be shared with a worker")
    # The real file: inotify must watch the directory SQLite writes the WAL in.
    return os.path.realpath(path)


def _dumps(value):
    """JSON of a value castor built itself (already known to be JSON)."""
    return _ENCODER.encode(value)


def _new_id():
    """A random (version 4) UUID string, faster than str(uuid.uuid4())."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _refuse(obj):
    raise NotJSONError(f"{obj!r} (type {type(obj).__name__})")


#: One encoder for all: json.dumps() with options builds a new one each call.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"), default=_refuse)


def _to_json(value, where):
    """``value`` as compact JSON, refusing what JSON cannot carry and naming it."""
    try:
        return _ENCODER.encode(value)
    except NotJSONError as exc:
        raise NotJSONError(f"{exc} in {where} is not JSON: use str, int, float, bool, "
                           "None, list or dict") from None
    except (TypeError, ValueError) as exc:  # NaN, infinity, bad keys, cycles
        raise NotJSONError(f"{where} are not JSON: {exc}") from None


def _iso(ts):
    """ISO-8601 UTC, as in the design plan: 2025-09-25T16:04:14.123456Z."""
    seconds = math.floor(ts)
    return f"{_iso_seconds(seconds)}.{min(999999, round((ts - seconds) * 1e6)):06d}Z"


@functools.lru_cache(maxsize=256)
def _iso_seconds(seconds):
    # Cached: the worker stamps thousands of tasks within the same second.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _parse_iso(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def _execute(task, args, kwargs):
    """Run a task function; its failure becomes data (a reply dict)."""
    try:
        result = task.func(*args, **kwargs)
        _to_json(result, f"the result of {task.name}")
        return {"ok": True, "result": result}
    except BaseException as exc:  # a task's SystemExit is its failure, not ours
        return {"ok": False, "error": _error_data(exc)}


def _error_data(exc, tb=None):
    """An exception as JSON: enough to rebuild it on the caller's side."""
    cls = type(exc)
    try:
        args = json.loads(_dumps(list(exc.args)))
    except Exception:  # arguments that are not JSON are simply not kept
        args = None
    try:
        message = str(exc)
    except Exception:  # a task's exception may not even print
        message = f"<unprintable {cls.__name__}>"
    if tb is None:
        tb = _format_traceback(exc, message)
    module = "castor" if cls.__module__ == __name__ else cls.__module__
    return {"module": module, "qualname": cls.__qualname__,
            "message": message, "args": args, "traceback": tb}


def _format_traceback(exc, message):
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:
        return f"{type(exc).__qualname__}: {message}\n"


def _castor_error(message):
    """Error data for a failure castor itself detects (lost, terminated...)."""
    return {"module": "castor", "qualname": "TaskError", "message": message,
            "args": [message], "traceback": f"castor.TaskError: {message}\n"}


def _apply_reply(doc, reply, now):
    """Write a finished run's outcome into its task document."""
    doc["finished_at"] = _iso(now)
    if reply["ok"]:
        doc.update(status="success", result=reply["result"], error=None, exception=None)
    else:
        err = reply["error"]
        doc.update(status="failed", result=None, error=err["traceback"], exception=err)


def _outcome(doc):
    """The result of a finished task document, or its exception raised."""
    if doc["status"] == "success":
        return doc["result"]
    if doc["status"] == "cancelled":
        raise TaskError(f"task {doc['id']} was cancelled", "castor.Cancelled")
    raise _rebuild(doc.get("exception") or _castor_error(str(doc.get("error"))))


def _rebuild(err):
    """The task's own exception type when this process knows it, else TaskError.

    Only modules already imported here are searched: the store is data, and a
    document never makes this process import code.
    """
    type_name = f"{err.get('module')}.{err.get('qualname')}"
    note = f"Traceback from the castor worker:\n{err.get('traceback', '')}"
    cls = _find_class(err.get("module"), err.get("qualname"))
    exc = None
    if cls is TaskError:  # castor's own verdicts: lost worker, unknown task...
        exc = TaskError(err.get("message"), type_name, err.get("traceback"))
    elif cls is not None and issubclass(cls, Exception):
        with contextlib.suppress(Exception):
            exc = cls(*(err.get("args") if err.get("args") is not None else [err.get("message")]))
    if exc is None:
        exc = TaskError(f"{type_name}: {err.get('message')}", type_name, err.get("traceback"))
    exc.add_note(note)
    return exc


def _find_class(module_name, qualname):
    if module_name == "builtins":
        module = builtins
    elif module_name == "castor":
        module = sys.modules[__name__]
    else:
        module = sys.modules.get(module_name)
        if module is None and module_name == _main_module_name():
            module = sys.modules.get("__main__")
    obj = module
    for part in (qualname or "").split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


# Storage ######################################################################
#
# The task documents live in beaver's own dict table, ``__beaver_dicts__``,
# under dict_name ``castor_tasks``: ``db.dict("castor_tasks")[task_id]`` reads
# them through beaver's public API. Castor writes them with its own SQL,
# because beaver's per-call API costs about 2 ms (an inter-process lock made of
# three transactions) and its blocking reads poll every 100 ms.
#
# Next to the documents castor keeps its own tables in the same file:
#   castor_jobs     one row per task, keyed by ``seq`` (queue order, also in
#                   the document): status, mode, priority, eta, owner. Its
#                   partial indexes cover pending and running rows apart from
#                   finished ones, so enqueue and claim cost the same with 100k
#                   finished tasks as with none.
#   castor_workers  one row per live worker, with a heartbeat.
#   castor_stats    counts of finished tasks by status, kept in step.
#   castor_periodic when each periodic task is next due.
#
# Every state change updates castor_jobs and the document in one
# ``BEGIN IMMEDIATE`` transaction: a claim marks the jobs running, names the
# worker and rewrites the documents atomically (two statements for a batch),
# so no task goes to two workers. A worker claims only as many tasks as it has
# free slots, and records finished tasks in the same transaction as its next
# claim (group commit).
#
# Waiting: ``join`` polls ``PRAGMA data_version``, which changes only when
# another connection commits (a few microseconds, and no document is read
# unless something changed); an idle worker sleeps until the file changes
# (see "Worker: waking up").
#
# Reliance on beaver internals: the table ``__beaver_dicts__`` and its columns
# (dict_name, key, value, expires_at) as beaver-db 2.x creates them. Pinned in
# pyproject.toml (beaver-db>=2.4,<3) and checked by test_storage_is_beaver_readable.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS castor_jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    eta REAL NOT NULL DEFAULT 0,
    worker TEXT,
    losses INTEGER NOT NULL DEFAULT 0,
    finished REAL
);
CREATE INDEX IF NOT EXISTS castor_jobs_ready
    ON castor_jobs (mode, priority, seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS castor_jobs_eta
    ON castor_jobs (mode, eta) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS castor_jobs_running
    ON castor_jobs (worker) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS castor_jobs_done
    ON castor_jobs (status, seq) WHERE finished IS NOT NULL;
CREATE TABLE IF NOT EXISTS castor_workers (
    id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS castor_stats (
    status TEXT PRIMARY KEY,
    n INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS castor_periodic (
    name TEXT PRIMARY KEY,
    next_run REAL NOT NULL
);
"""

_WHERE_DOC = f"WHERE dict_name = '{DICT_NAME}' AND key"
_ADD_DOC = ("INSERT INTO __beaver_dicts__ (dict_name, key, value, expires_at) "
            f"VALUES ('{DICT_NAME}', ?, ?, NULL)")
_RESTORE_DOC = _ADD_DOC.replace("INSERT", "INSERT OR IGNORE", 1)
_SET_DOC = f"UPDATE __beaver_dicts__ SET value = ? {_WHERE_DOC} = ?"
_GET_DOC = f"SELECT value FROM __beaver_dicts__ {_WHERE_DOC} = ?"
_DEL_DOC = f"DELETE FROM __beaver_dicts__ {_WHERE_DOC} = ?"
_ADD_JOB = ("INSERT INTO castor_jobs (seq, id, name, mode, status, priority, eta) "
            "VALUES (?, ?, ?, ?, 'pending', ?, ?)")
_BUMP = ("INSERT INTO castor_stats (status, n) VALUES (?, ?) "
         "ON CONFLICT (status) DO UPDATE SET n = n + excluded.n")

#: A claim rewrites its documents inside SQLite: one statement for the batch.
#: A document that is not a JSON object is left alone, to be failed as corrupt.
_CLAIM_DOCS = (
    "UPDATE __beaver_dicts__ SET value = CASE WHEN json_valid(value) THEN "
    "CASE WHEN json_type(value) = 'object' THEN json_set(value, '$.status', 'running', "
    "'$.started_at', ?, '$.worker', ?, '$.attempts', "
    "coalesce(json_extract(value, '$.attempts'), 0) + 1) ELSE value END ELSE value END "
    f"{_WHERE_DOC} IN ({{marks}}) RETURNING key, value")


class _Store:
    """Castor's SQL on the beaver file: one connection per thread."""

    def __init__(self, path):
        self.path = path
        self._local = threading.local()
        self._schema_ready = False

    @property
    def conn(self):
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # not across fork()
            local.conn, local.pid = self._connect(), os.getpid()
        return local.conn

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                               check_same_thread=False)
        # Same durability as beaver's own connection on this file: WAL and
        # synchronous=NORMAL survive a killed process, with no fsync a commit.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA mmap_size = 268435456")
        if not self._schema_ready:
            self._create_schema(conn)
        return conn

    def _create_schema(self, conn):
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'castor_periodic'").fetchone():
            with self.transaction(conn):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
        self._schema_ready = True

    @contextlib.contextmanager
    def transaction(self, conn=None):
        """A write transaction that takes the lock up front (no deadlocks)."""
        conn = conn or self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # also after a failed COMMIT (disk full...)
                conn.execute("ROLLBACK")
            raise

    def data_version(self):
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    # Documents ----------------------------------------------------------------

    def get_doc(self, task_id):
        row = self.conn.execute(_GET_DOC, (task_id,)).fetchone()
        return None if row is None else _load_doc(task_id, row[0])

    def list_docs(self, status, limit):
        if status is None:
            rows = self.conn.execute(
                "SELECT id FROM castor_jobs ORDER BY seq DESC LIMIT ?", (limit,))
        elif status in ("pending", "running"):  # their partial indexes are small
            rows = self.conn.execute(
                "SELECT id FROM castor_jobs WHERE status = ? ORDER BY seq DESC LIMIT ?",
                (status, limit))
        else:
            rows = self.conn.execute(
                "SELECT id FROM castor_jobs INDEXED BY castor_jobs_done WHERE status = ? "
                "AND finished IS NOT NULL ORDER BY seq DESC LIMIT ?", (status, limit))
        docs = (self.get_doc(task_id) for (task_id,) in rows.fetchall())
        return [doc for doc in docs if doc is not None]

    def enqueue(self, docs):
        with self.transaction() as conn:
            self.enqueue_in(conn, docs)

    def enqueue_in(self, conn, docs):
        """Add pending tasks; their ``seq`` (queue order) goes in the document too.

        Serializing is the JSON check: a bad argument raises NotJSONError here,
        inside the transaction, and nothing at all is enqueued.
        """
        top = conn.execute("SELECT coalesce(max(seq), 0) FROM castor_jobs").fetchone()[0]
        jobs, rows = [], []
        for seq, doc in enumerate(docs, top + 1):
            eta = doc.pop("eta_ts")
            doc["seq"] = seq
            rows.append((doc["id"], _to_json(doc, f"the arguments of {doc['task_name']}")))
            jobs.append((seq, doc["id"], doc["task_name"], doc["mode"], doc["priority"], eta))
        conn.executemany(_ADD_DOC, rows)
        conn.executemany(_ADD_JOB, jobs)

    def put_finished(self, doc):
        """Store a task that already ran (immediate mode)."""
        doc.pop("eta_ts", None)
        with self.transaction() as conn:
            conn.execute(_ADD_DOC, (doc["id"], _dumps(doc)))
            conn.execute(
                "INSERT INTO castor_jobs (id, name, mode, status, finished) VALUES (?, ?, ?, ?, ?)",
                (doc["id"], doc["task_name"], doc["mode"], doc["status"], time.time()))
            conn.execute(_BUMP, (doc["status"], 1))

    def cancel(self, task_id, now):
        with self.transaction() as conn:
            doc = self.get_doc(task_id)
            if doc is None:
                return False
            if isinstance(doc.get("seq"), int):
                where, key = "seq = ? AND id = ?", (doc["seq"], task_id)
            else:  # a document someone rewrote: find its job the slow way
                where, key = "id = ?", (task_id,)
            done = conn.execute(
                "UPDATE castor_jobs SET status = 'cancelled', finished = ? "
                f"WHERE {where} AND status = 'pending'", (now, *key)).rowcount
            if not done:
                return False
            doc.update(status="cancelled", finished_at=_iso(now))
            conn.execute(_SET_DOC, (_dumps(doc), task_id))
            conn.execute(_BUMP, ("cancelled", 1))
        return True

    # Queries ------------------------------------------------------------------

    def counts(self):
        counts = dict.fromkeys(STATUSES, 0)
        conn = self.conn
        # Both counts walk a partial index holding only unfinished tasks.
        counts["pending"] = conn.execute(
            "SELECT count(*) FROM castor_jobs INDEXED BY castor_jobs_eta "
            "WHERE status = 'pending'").fetchone()[0]
        counts["running"] = conn.execute(
            "SELECT count(*) FROM castor_jobs INDEXED BY castor_jobs_running "
            "WHERE status = 'running'").fetchone()[0]
        for status, n in conn.execute("SELECT status, n FROM castor_stats"):
            counts[status] = n
        return counts

    def prune(self, before):
        with self.transaction() as conn:
            rows = conn.execute(
                "SELECT seq, id, status FROM castor_jobs WHERE finished IS NOT NULL "
                "AND finished < ?", (before,)).fetchall()
            conn.executemany("DELETE FROM castor_jobs WHERE seq = ?", [(r[0],) for r in rows])
            conn.executemany(_DEL_DOC, [(r[1],) for r in rows])
            for status, n in collections.Counter(r[2] for r in rows).items():
                conn.execute(_BUMP, (status, -n))
        return len(rows)

    def has_ready(self, mode, now):
        return self.conn.execute(
            "SELECT 1 FROM castor_jobs INDEXED BY castor_jobs_eta WHERE status = 'pending' "
            "AND mode = ? AND eta <= ? LIMIT 1", (mode, now)).fetchone() is not None

    def next_eta(self, mode):
        return self.conn.execute(
            "SELECT min(eta) FROM castor_jobs INDEXED BY castor_jobs_eta "
            "WHERE status = 'pending' AND mode = ?", (mode,)).fetchone()[0]

    # Worker side (called inside a transaction) --------------------------------

    def claim(self, conn, worker_id, mode, limit, now):
        """Mark up to ``limit`` due tasks running for this worker: [(seq, doc)],
        in queue order. Two statements, however many tasks."""
        jobs = conn.execute(
            "UPDATE castor_jobs SET status = 'running', worker = ? WHERE seq IN ("
            "SELECT seq FROM castor_jobs INDEXED BY castor_jobs_ready WHERE status = 'pending' "
            "AND mode = ? AND eta <= ? ORDER BY priority, seq LIMIT ?) RETURNING priority, seq, id",
            (worker_id, mode, now, limit)).fetchall()
        if not jobs:
            return []
        ids = [task_id for _, _, task_id in jobs]
        docs = dict(conn.execute(_CLAIM_DOCS.format(marks=",".join("?" * len(ids))),
                                 (_iso(now), worker_id, *ids)).fetchall())
        claimed = []
        for _, seq, task_id in sorted(jobs):  # RETURNING has no order of its own
            raw = docs.get(task_id)
            doc = _load_doc(task_id, raw) if raw is not None else _missing_doc(task_id, None)
            if doc.get("status") != "running":  # corrupt: still ours to fail
                doc.update(status="running", started_at=_iso(now), worker=worker_id)
            claimed.append((seq, doc))
        return claimed

    def finish(self, conn, worker_id, outcomes, now):
        """Record final outcomes [(seq, doc, json)]; the docs this worker still owned."""
        changed = conn.executemany(
            "UPDATE castor_jobs SET status = ?, worker = NULL, finished = ? "
            "WHERE seq = ? AND id = ? AND worker = ? AND status = 'running'",
            [(doc["status"], now, seq, doc["id"], worker_id) for seq, doc, _ in outcomes]).rowcount
        kept = outcomes
        if changed < len(outcomes):  # some lease was lost: which rows did we write?
            marks = ",".join("?" * len(outcomes))
            mine = {seq for (seq,) in conn.execute(
                f"SELECT seq FROM castor_jobs WHERE seq IN ({marks}) AND worker IS NULL "
                "AND finished = ?", (*[seq for seq, _, _ in outcomes], now))}
            kept = [outcome for outcome in outcomes if outcome[0] in mine]
        rows = [(raw, doc["id"]) for _, doc, raw in kept]
        if conn.executemany(_SET_DOC, rows).rowcount < len(rows):
            # Someone deleted a document meanwhile: the outcome brings it back.
            conn.executemany(_RESTORE_DOC, [(key, raw) for raw, key in rows])
        for status, n in collections.Counter(doc["status"] for _, doc, _ in kept).items():
            conn.execute(_BUMP, (status, n))
        return [doc for _, doc, _ in kept]

    def retry_later(self, conn, worker_id, seq, doc, raw, eta):
        """Put a failed attempt back to pending until ``eta``."""
        if not conn.execute("SELECT 1 FROM castor_jobs WHERE seq = ? AND id = ? AND worker = ? "
                            "AND status = 'running'", (seq, doc["id"], worker_id)).fetchone():
            return False
        conn.execute("UPDATE castor_jobs SET status = 'pending', worker = NULL, eta = ? "
                     "WHERE seq = ?", (eta, seq))
        conn.execute(_SET_DOC, (raw, doc["id"]))
        return True

    def requeue_owned(self, conn, owners, now, loss, orphans=False):
        """Return the running tasks of ``owners`` (and, with ``orphans``, of no
        live worker) to pending, adding ``loss`` to their losses."""
        marks = ",".join("?" * len(owners))
        orphaned = ("OR worker IS NULL OR worker NOT IN (SELECT id FROM castor_workers)"
                    if orphans else "")
        rows = conn.execute(
            "SELECT seq, id, losses FROM castor_jobs INDEXED BY castor_jobs_running "
            f"WHERE status = 'running' AND (worker IN ({marks}) {orphaned})", owners).fetchall()
        return [self._requeue(conn, seq, task_id, losses + loss, now)
                for seq, task_id, losses in rows]

    def _requeue(self, conn, seq, task_id, losses, now):
        doc = self.get_doc(task_id) or _missing_doc(task_id)
        doc.update(losses=losses, worker=None, started_at=None,
                   attempts=max(0, _as_int(doc.get("attempts")) - 1))
        if losses >= MAX_LOSSES:
            doc["attempts"] += 1
            _apply_reply(doc, {"ok": False, "error": _castor_error(
                f"worker lost {losses} times while running this task; giving up")}, now)
            conn.execute("UPDATE castor_jobs SET status = 'failed', worker = NULL, "
                         "losses = ?, finished = ? WHERE seq = ?", (losses, now, seq))
            conn.execute(_BUMP, ("failed", 1))
        else:
            doc["status"] = "pending"
            conn.execute("UPDATE castor_jobs SET status = 'pending', worker = NULL, "
                         "losses = ? WHERE seq = ?", (losses, seq))
        conn.execute(_SET_DOC, (_dumps(doc), task_id))
        return doc

    # Workers ------------------------------------------------------------------

    def register_worker(self, worker_id, now):
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO castor_workers VALUES (?, ?, ?, ?, ?)",
                         (worker_id, os.getpid(), _host_id(), now, now))

    def heartbeat(self, worker_id, now):
        """Renew this worker's lease; False if others had given it up for dead."""
        with self.transaction() as conn:
            return conn.execute("UPDATE castor_workers SET heartbeat = ? WHERE id = ?",
                                (now, worker_id)).rowcount == 1

    def deregister_worker(self, worker_id):
        with self.transaction() as conn:
            conn.execute("DELETE FROM castor_workers WHERE id = ?", (worker_id,))

    def workers(self):
        return self.conn.execute("SELECT id, pid, host, heartbeat FROM castor_workers").fetchall()

    def reap(self, dead, now):
        """Requeue the tasks of ``dead`` {worker: heartbeat seen} and of no worker.

        A worker is only removed if its heartbeat is still the one seen: one
        that beat meanwhile is alive after all.
        """
        with self.transaction() as conn:
            gone = [wid for wid, beat in dead.items() if conn.execute(
                "DELETE FROM castor_workers WHERE id = ? AND heartbeat = ?", (wid, beat)).rowcount]
            return self.requeue_owned(conn, gone, now, loss=1, orphans=True)

    def has_orphans(self):
        return self.conn.execute(
            "SELECT 1 FROM castor_jobs INDEXED BY castor_jobs_running WHERE status = 'running' "
            "AND (worker IS NULL OR worker NOT IN (SELECT id FROM castor_workers)) LIMIT 1"
        ).fetchone() is not None

    def due_periodic(self, conn, name, every, now):
        """True when this worker won the right to enqueue ``name`` now, else when it is due."""
        row = conn.execute("SELECT next_run FROM castor_periodic WHERE name = ?", (name,)).fetchone()
        if row is not None and row[0] > now:
            return row[0]
        # Missed periods while no worker ran are skipped, not run in a burst.
        next_run = now + every if row is None or row[0] + every <= now else row[0] + every
        conn.execute("INSERT OR REPLACE INTO castor_periodic VALUES (?, ?)", (name, next_run))
        return True


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def _load_doc(task_id, raw):
    """A document as stored; garbage becomes a document that says so."""
    try:
        # NaN and Infinity (which beaver's json.dumps lets through) are garbage
        # too: SQLite's JSON functions refuse them.
        doc = json.loads(raw, parse_constant=_no_constants)
    except (TypeError, ValueError):
        doc = None
    if not isinstance(doc, dict) or doc.get("status") not in STATUSES:
        return _missing_doc(task_id, raw)
    return doc


def _missing_doc(task_id, raw=None):
    return {"id": task_id, "task_name": None, "status": "pending", "args": None, "kwargs": None,
            "corrupt": "the document is missing" if raw is None else str(raw)[:1000]}


def _as_int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@functools.cache
def _host_id():
    """This machine, and its pid namespace: a pid means something only there."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


def _alive(pid, host):
    """False only when the process surely is gone (same host, no such pid)."""
    if host != _host_id():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# Worker #######################################################################


class _Run:
    """A task this worker is running."""

    __slots__ = ("seq", "doc", "task", "mode", "started", "deadline")

    def __init__(self, seq, doc, task, mode, started):
        self.seq, self.doc, self.task, self.mode = seq, doc, task, mode
        self.started = started
        timeout = task.timeout if task is not None else None
        self.deadline = None if timeout is None or mode == "process" else started + timeout


class Worker:
    """Runs a manager's tasks: threads for mode="thread", processes for "process".

    ``run()`` blocks until ``stop()`` or SIGINT/SIGTERM (in the main thread);
    a second signal exits at once and puts running tasks back to pending.
    """

    def __init__(self, manager, workers=None, threads=None, *, target=None, imports=()):
        self.manager = manager
        self.workers = workers or os.cpu_count() or 1
        self.threads = threads or self.workers * 2
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.target = target
        self.imports = list(imports)
        self.state = "Idle"
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._inbox = _Inbox(manager.path)
        self._running = {}
        self._abandoned = 0  # thread tasks that timed out but still hold a thread
        self._threads = None
        self._procs = None
        self._more = {}  # mode -> the last claim came back full: claim again
        self._next_eta = {}
        self._seen = {}  # mode -> data_version when we last looked for work
        self._next_beat = self._next_reap = 0.0
        self._beats = 0
        self._observed = {}  # other worker -> (heartbeat seen, our beats then)
        self._periodic_due = {}
        self._unrecorded = []

    # Public -------------------------------------------------------------------

    def stop(self, now=False):
        """Stop claiming and finish running tasks; ``now=True`` gives them back."""
        (self._abort if now else self._stop).set()
        self._inbox.put(None)  # wake the loop

    def busy(self):
        """``{"thread": (busy, total), "process": (busy, total)}``."""
        # list() copies in one step: the dashboard calls this from its thread.
        modes = collections.Counter(run.mode for run in list(self._running.values()))
        return {"thread": (modes["thread"] + self._abandoned, self.threads),
                "process": (modes["process"], self.workers)}

    def run(self):
        """Serve tasks until stopped. Returns 0 after a graceful stop, 1 if forced."""
        if os.environ.get("CASTOR_POOL_CHILD"):
            raise CastorError("a process-pool child imported a module that starts a worker: "
                              "put Worker(...).run() under `if __name__ == '__main__':`")
        config = self._child_config()  # fail here, before touching signals or the store
        restore = self._install_signals()
        try:
            self.state = "Running"
            self.manager._store.register_worker(self.id, time.time())
            self._start_pools(config)
            logger.info("Worker %s serving %d task(s) from %s", self.id,
                        len(self.manager._tasks), self.manager.path)
            self._serve()
        finally:
            forced = self._abort.is_set()
            self._shutdown(forced)
            restore()
            self.state = "Stopped"
        return 1 if forced else 0

    # Loop ---------------------------------------------------------------------

    def _serve(self):
        while not self._abort.is_set():
            try:
                self._tick(time.time())
            except Exception:
                logger.exception("worker loop error (will retry)")
                self._abort.wait(0.5)
            if self._stop.is_set() and self.state == "Stopping" and not (
                    self._running or self._unrecorded):
                return
            self._wait(time.time())

    def _tick(self, now):
        if self._stop.is_set() and self.state == "Running":
            self._begin_stopping(now)
        sweep = now >= self._next_beat
        if sweep:
            self._housekeeping(now)
        if not self._stop.is_set():
            self._enqueue_periodic(now)
        self._step(now, sweep)

    def _step(self, now, sweep=False):
        """One iteration: record finished tasks and claim new ones, one transaction."""
        # Outcomes stay in _unrecorded until a commit holds them: a failed
        # transaction (a file locked too long) must not lose a result.
        self._unrecorded += self._collect() + self._expired(now)
        finished = self._unrecorded
        modes = [] if self._stop.is_set() else self._claimable(now, sweep)
        if not finished and not modes:
            return
        store = self.manager._store
        with store.transaction() as conn:
            retried = self._record(conn, finished, now)
            claimed = {mode: store.claim(conn, self.id, mode, free, now) for mode, free in modes}
            for mode, free in modes:
                self._more[mode] = len(claimed[mode]) == free
                if not self._more[mode]:  # drained for now: when is the next one due?
                    self._next_eta[mode] = store.next_eta(mode)
        self._unrecorded = []
        if retried:
            self._seen.clear()  # our own commit put work back: look again
        self._log_finished(finished)
        for mode, _ in modes:
            for seq, doc in claimed[mode]:
                self._dispatch(seq, doc, mode)

    def _wait(self, now):
        """Sleep until the file changes, a task finishes, or something falls due."""
        wake = [self._next_beat]
        wake += [run.deadline for run in list(self._running.values()) if run.deadline]
        if not self._stop.is_set():
            for mode, _ in self._free_modes():
                if self._pool(mode) is not None and self._next_eta.get(mode) is not None:
                    wake.append(self._next_eta[mode])
            wake += self._periodic_due.values()
        self._inbox.wait(max(0.0, min(wake) - now))
        if self._inbox.pending() and any(self._more.values()):
            # A backlog: give the other running tasks a moment to finish too,
            # so that one commit records them all.
            self._inbox.settle(len(self._running), time.time() + GROUP_COMMIT_WINDOW)

    def _collect(self):
        """Completions from the pools: (run, reply, finished_at)."""
        finished = []
        for item in self._inbox.drain():
            if item is None:
                continue
            task_id, reply, ended = item
            run = self._running.pop(task_id, None)
            if run is None:  # timed out or terminated earlier: result discarded
                if reply.get("mode") == "thread":
                    self._abandoned -= 1
                continue
            finished.append((run, reply, ended))
        return finished

    def _expired(self, now):
        """Thread tasks past their timeout: failed now, their thread abandoned."""
        expired = []
        for task_id, run in list(self._running.items()):
            if run.deadline is not None and now >= run.deadline:
                del self._running[task_id]
                self._abandoned += 1
                error = _error_data(TimeoutError(
                    f"task exceeded its timeout of {run.task.timeout:g}s "
                    "(its thread cannot be killed; its late result will be discarded)"))
                expired.append((run, {"ok": False, "error": error}, now))
        return expired

    def _free_modes(self):
        busy = self.busy()
        return [(mode, total - used) for mode, (used, total) in busy.items() if used < total]

    def _claimable(self, now, sweep):
        """Modes worth a claim now, with their free slots.

        A mode whose last claim came back full is claimed again at once;
        another only when the file changed or a scheduled task fell due. A
        mode with no pool here is looked at only on a ``sweep`` (once a
        second), just to fail the tasks this worker cannot run.
        """
        store, version, ready = self.manager._store, None, []
        for mode, n in self._free_modes():
            if self._more.get(mode):
                ready.append((mode, n))
                continue
            if self._pool(mode) is None and not sweep:
                continue
            eta = self._next_eta.get(mode)
            version = store.data_version() if version is None else version
            if self._seen.get(mode) == version and (eta is None or eta > now):
                continue
            self._seen[mode] = version
            if store.has_ready(mode, now):
                ready.append((mode, n))
            else:
                self._next_eta[mode] = store.next_eta(mode)
        return ready

    def _record(self, conn, finished, now):
        """Write outcomes; True if any task went back to pending for a retry."""
        store, final, retried = self.manager._store, [], False
        for run, reply, ended in finished:
            try:
                delay = self._retry_delay(run, reply)
                if delay is not None:
                    retried = True
                    self._retry(conn, run, reply, ended, delay)
                    continue
                _apply_reply(run.doc, reply, ended)
                raw = _dumps(run.doc)
            except Exception as exc:  # one bad outcome must not block the others
                logger.exception("Task %s: could not record its outcome", run.doc["id"][:8])
                run.doc = _missing_doc(run.doc.get("id"), "an outcome castor could not record")
                _apply_reply(run.doc, {"ok": False, "error": _castor_error(
                    f"castor could not record this task's outcome: {exc!r}")}, ended)
                raw = _dumps(run.doc)
            final.append((run.seq, run.doc, raw))
        if final:
            kept = {id(doc) for doc in store.finish(conn, self.id, final, now)}
            for _, doc, _ in final:
                if id(doc) not in kept:
                    logger.warning("Task %s: lease lost, result discarded", doc["id"][:8])
        return retried

    def _retry(self, conn, run, reply, ended, delay):
        doc = run.doc
        doc.update(status="pending", worker=None, error=reply["error"]["traceback"],
                   exception=reply["error"], started_at=None, retry_at=_iso(ended + delay))
        self.manager._store.retry_later(conn, self.id, run.seq, doc, _dumps(doc), ended + delay)

    def _retry_delay(self, run, reply):
        """Seconds until the next attempt, or None when this was the last one."""
        task, attempts = run.task, _as_int(run.doc.get("attempts")) or 1
        if reply["ok"] or task is None or attempts > task.retries:
            return None
        base = task.retry_delay * 2 ** (attempts - 1)
        return min(base * random.uniform(1.0, 1.25), MAX_SECONDS)  # jitter: no stampede

    def _log_finished(self, finished):
        for run, reply, ended in finished:
            short, doc = run.doc["id"][:8], run.doc
            if reply["ok"]:
                logger.info("Task %s finished successfully in %.2fs", short,
                            max(0.0, ended - run.started))
            elif doc["status"] == "pending":
                logger.warning("Task %s failed (attempt %d of %d), retrying at %s: %s", short,
                               doc["attempts"], run.task.retries + 1, doc["retry_at"],
                               _short_error(reply["error"]))
            else:
                logger.error("Task %s failed: %s", short, _short_error(reply["error"]))

    def _dispatch(self, seq, doc, mode):
        """Hand a claimed task to its pool; any problem fails that task only."""
        task = self.manager._tasks.get(doc.get("task_name"))
        pool = self._pool_for(task)
        run = _Run(seq, doc, task, mode if pool is None else task.mode, time.time())
        self._running[doc["id"]] = run
        try:
            problem = _job_problem(doc, task, self.target)
            if problem is None and pool is None:
                problem = f"{task.name} is a {task.mode} task but this worker has no {task.mode} pool"
            if problem is not None:
                raise CastorError(problem)
            if logger.isEnabledFor(logging.INFO):
                logger.info("Task %s started: %s", doc["id"][:8], _call_repr(doc))
            pool.submit({"id": doc["id"], "name": task.name, "args": doc["args"],
                         "kwargs": doc["kwargs"], "timeout": task.timeout})
        except Exception as exc:
            message = str(exc) if isinstance(exc, CastorError) else f"could not start: {exc!r}"
            self._inbox.put((doc["id"], {"ok": False, "error": _castor_error(message)}, time.time()))

    def _pool_for(self, task):
        return None if task is None else self._pool(task.mode)

    def _pool(self, mode):
        return self._threads if mode == "thread" else self._procs

    # Housekeeping -------------------------------------------------------------

    def _housekeeping(self, now):
        store = self.manager._store
        self._next_beat = now + HEARTBEAT_INTERVAL
        if store.heartbeat(self.id, now):
            self._beats += 1
        else:
            logger.warning("Worker %s was taken for dead; registering again", self.id)
            store.register_worker(self.id, now)
        if now >= self._next_reap:
            self._next_reap = now + REAP_INTERVAL
            self._reap(now)

    def _reap(self, now):
        """Give back the tasks of workers that are surely dead.

        Dead means: its process is gone (same machine), or its heartbeat has
        not moved while this worker beat LEASE_TIMEOUT seconds' worth. Wall
        time alone is not enough: when someone holds the file locked, nobody
        can beat, and the first to get through must not bury the others.
        """
        store, dead = self.manager._store, {}
        rows = store.workers()
        for wid, pid, host, beat in rows:
            if wid == self.id:
                continue
            seen, beats = self._observed.get(wid, (None, None))
            if beat != seen:
                self._observed[wid] = (beat, self._beats)
                beats = self._beats
            silent = self._beats - beats >= LEASE_TIMEOUT / HEARTBEAT_INTERVAL
            if not _alive(pid, host) or (silent and beat < now - LEASE_TIMEOUT):
                dead[wid] = beat
        self._observed = {wid: v for wid, v in self._observed.items()
                          if any(wid == row[0] for row in rows)}
        if not dead and not store.has_orphans():
            return
        for doc in store.reap(dead, now):
            self._seen.clear()  # our own commit put work back: look again
            logger.warning("Task %s: its worker died; %s", doc["id"][:8],
                           "giving up" if doc["status"] == "failed" else "back to pending")

    def _enqueue_periodic(self, now):
        """Each period, exactly one worker wins the transaction that enqueues."""
        store = self.manager._store
        for task in self.manager._tasks.values():
            if task.every is None or self._periodic_due.get(task.name, 0) > now:
                continue
            with store.transaction() as conn:
                due = store.due_periodic(conn, task.name, task.every, now)
                if due is True:
                    doc = task._document((), {}, now, now, task.priority)
                    store.enqueue_in(conn, [doc])
            if due is True:
                self._seen.clear()
                logger.info("Periodic task %s enqueued as %s", task.name, doc["id"][:8])
            else:
                self._periodic_due[task.name] = due

    # Start and stop -----------------------------------------------------------

    def _child_config(self):
        if not any(t.mode == "process" for t in self.manager._tasks.values()):
            return None
        return _child_config(self.manager, self.target, self.imports)

    def _start_pools(self, config):
        self._threads = _ThreadPool(self.manager, self.threads, self._inbox)
        if config is not None:
            self._procs = _ProcessPool(config, self.workers, self._inbox)

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum, frame):
            # Only flags here; the wakeup fd below has already woken the loop.
            (self._abort if self._stop.is_set() else self._stop).set()
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        previous_fd = signal.set_wakeup_fd(self._inbox.wakeup_fd)

        def restore():
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return restore

    def _begin_stopping(self, now):
        """Stop claiming; daemon tasks are terminated, critical ones awaited."""
        self.state = "Stopping"
        logger.info("Shutting down: waiting for %d running task(s); Ctrl+C again to exit now",
                    sum(1 for r in self._running.values() if not (r.task and r.task.daemon)))
        daemons = [run for run in self._running.values() if run.task and run.task.daemon]
        for run in daemons:
            del self._running[run.doc["id"]]
            if run.mode == "process":
                self._procs.kill(run.doc["id"])
            else:
                self._abandoned += 1
        self._unrecorded += [
            (run, {"ok": False, "error": _castor_error("terminated at shutdown")}, now)
            for run in daemons]

    def _shutdown(self, forced):
        """Leave nothing behind: children killed, outcomes kept, the rest given back."""
        if self._procs is not None:
            self._procs.close(kill=forced)
        store = self.manager._store
        try:
            self._unrecorded += self._collect()
            if self._unrecorded:
                with store.transaction() as conn:
                    self._record(conn, self._unrecorded, time.time())
                self._log_finished(self._unrecorded)
            with store.transaction() as conn:
                requeued = store.requeue_owned(conn, [self.id], time.time(), loss=0)
            if requeued:
                logger.warning("Exiting now: %d running task(s) back to pending", len(requeued))
            store.deregister_worker(self.id)
        except Exception:  # even then: close up, other workers will take over
            logger.exception("could not give back running tasks; other workers will")
        self._inbox.close()
        logger.info("Worker %s stopped", self.id)


def _job_problem(doc, task, target):
    """Why a claimed task cannot run here, or None."""
    if doc.get("corrupt") is not None:
        return f"the task document is corrupt: {doc['corrupt']!r}"
    if task is None:
        where = target or "the manager's module"
        return (f"unknown task {doc.get('task_name')!r}: this worker has no such task. "
                f"Register it by importing its module from {where}, or start the worker "
                "with --import MODULE")
    if not isinstance(doc.get("args"), list) or not isinstance(doc.get("kwargs"), dict):
        return f"the task document has bad args/kwargs: {doc.get('args')!r}, {doc.get('kwargs')!r}"
    return None


def _short_error(err):
    return f"{err.get('qualname')}: {err.get('message')}"


def _call_repr(doc):
    parts = [repr(a) for a in doc["args"]] + [f"{k}={v!r}" for k, v in doc["kwargs"].items()]
    text = f"{doc['task_name']}({', '.join(parts)})"
    return text if len(text) <= 120 else text[:117] + "..."


# Worker: waking up ###########################################################
#
# An idle worker must start a new task within milliseconds yet cost almost no
# CPU. It sleeps in select() on two file descriptors: a pipe that the pools
# (and, through set_wakeup_fd, signals) write to when there is news, and an
# inotify watch on the database's directory, which fires when any process
# commits to the file (a commit writes the WAL). Where inotify is missing the
# worker polls every IDLE_POLL seconds instead.


class _Inbox:
    """Completed tasks, plus a way to sleep until there is news."""

    def __init__(self, db_path):
        self._items = collections.deque()
        self._sleeping = False  # only a sleeping loop needs a byte in the pipe
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._watch = _inotify_watch(os.path.dirname(db_path))

    @property
    def wakeup_fd(self):
        return self._write

    def put(self, item):
        self._items.append(item)  # deque.append is thread-safe
        if self._sleeping:  # see _sleep: one of the two always sees the other
            with contextlib.suppress(BlockingIOError):
                os.write(self._write, b"!")

    def pending(self):
        return len(self._items)

    def settle(self, count, deadline):
        """Wait until ``count`` items are in, or ``deadline`` (time.time())."""
        while len(self._items) < count:
            left = deadline - time.time()
            if left <= 0 or not self._sleep([self._read], left, len(self._items)):
                return

    def drain(self):
        items = []
        with contextlib.suppress(IndexError):
            while True:
                items.append(self._items.popleft())
        return items

    def wait(self, timeout):
        fds = [self._read] if self._watch is None else [self._read, self._watch]
        if self._watch is None:
            timeout = min(timeout, IDLE_POLL)
        self._sleep(fds, timeout)

    def _sleep(self, fds, timeout, have=0):
        """select() on ``fds`` unless more than ``have`` items are in; True if woken."""
        # The flag goes up before the check; put() appends before it looks at
        # the flag. Either this sees the item or put() sees the flag.
        self._sleeping = True
        try:
            if len(self._items) > have:
                return True
            ready, _, _ = select.select(fds, [], [], timeout)
        finally:
            self._sleeping = False
        for fd in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(fd, 65536):
                    pass
        return bool(ready)

    def close(self):
        for fd in (self._read, self._write, self._watch):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _inotify_watch(directory):
    """A non-blocking inotify fd that becomes readable when files in
    ``directory`` are written, or None where inotify is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    in_modify, in_create, in_moved_to = 0x2, 0x100, 0x80
    if libc.inotify_add_watch(fd, os.fsencode(directory), in_modify | in_create | in_moved_to) < 0:
        os.close(fd)
        return None
    return fd


# Worker: thread pool ##########################################################


class _ThreadPool:
    """Daemon threads, so a forced exit never waits on a hung task."""

    def __init__(self, manager, size, done):
        self.manager, self.done = manager, done
        self.jobs = queue.Queue()
        for n in range(size):
            threading.Thread(target=self._serve, name=f"castor-thread-{n}", daemon=True).start()

    def submit(self, job):
        self.jobs.put(job)

    def _serve(self):
        while True:
            job = self.jobs.get()
            try:
                reply = _execute(self.manager._tasks[job["name"]], job["args"], job["kwargs"])
            except BaseException as exc:  # every job must report, whatever happens
                reply = {"ok": False, "error": _castor_error(f"the task crashed castor: {exc!r}")}
            reply["mode"] = "thread"
            self.done.put((job["id"], reply, time.time()))


# Worker: process pool #########################################################
#
# Each slot owns one child process, started with subprocess (fork+exec, never
# a bare fork of this threaded process) in a session of its own, so a terminal's
# Ctrl+C reaches only the worker, which decides what happens to the children.
# A child imports the same modules the worker did and finds tasks by name in
# its own registry. It never opens the database: it reads a job as a JSON line
# on stdin and writes the reply as a JSON line on its original stdout (the
# task's own prints go to stderr). The slot kills and replaces its child when a
# task times out or the child dies.


class _ProcessPool:
    def __init__(self, config, size, done):
        self.jobs = queue.Queue()
        self.cancelled = set()  # ids of queued jobs that must not start
        self.slots = [_ProcessSlot(self, config, done, n) for n in range(size)]
        for slot in self.slots:
            slot.start()

    def submit(self, job):
        self.jobs.put(job)

    def kill(self, task_id):
        self.cancelled.add(task_id)
        for slot in self.slots:
            if slot.current == task_id:
                slot.kill_child()

    def close(self, kill=False):
        for slot in self.slots:
            self.jobs.put(None)
        for slot in self.slots:
            slot.stop(kill)


class _ProcessSlot(threading.Thread):
    def __init__(self, pool, config, done, n):
        super().__init__(name=f"castor-process-{n}", daemon=True)
        self.pool, self.config, self.jobs, self.done = pool, config, pool.jobs, done
        self.child = None
        self.current = None
        self.closing = False
        self._lock = threading.Lock()

    def run(self):
        while True:
            # Warm up (again) before the next task: a new child takes a while.
            with contextlib.suppress(Exception):
                self._ensure_child()
            job = self.jobs.get()
            if job is None:
                return
            # current first, then the check: kill() adds to cancelled first,
            # then looks at current, so one of the two always sees the other.
            self.current = job["id"]
            if job["id"] in self.pool.cancelled:
                self.current = None
                continue
            reply = self._run_job(job)
            reply["mode"] = "process"
            self.current = None
            self.done.put((job["id"], reply, time.time()))

    def _run_job(self, job):
        try:
            child = self._ensure_child()
            child.stdin.write((_dumps(job) + "\n").encode())
            child.stdin.flush()
        except (OSError, CastorError) as exc:
            self.kill_child()
            return {"ok": False, "error": _castor_error(f"could not start the task's process: {exc}")}
        line = self._read_line(child, job["timeout"])
        if line is None:
            self.kill_child()
            return {"ok": False, "error": _error_data(TimeoutError(
                f"task exceeded its timeout of {job['timeout']:g}s; its process was killed"))}
        if not line:
            code = child.wait()
            self.child = None
            return {"ok": False, "error": _castor_error(
                f"the task's process died ({_exit_reason(code)}); the pool replaced it")}
        return json.loads(line)

    def _read_line(self, child, timeout):
        """A reply line; None on timeout; b"" when the child died."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = child.stdout.fileno()
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], 1.0 if left is None else min(left, 1.0))
            if ready:
                return child.stdout.readline()

    def _ensure_child(self):
        with self._lock:
            if self.child is not None and self.child.poll() is None:
                return self.child
            if self.closing:
                raise CastorError("the worker is shutting down")
            self.child = _spawn_child(self.config)
            return self.child

    def kill_child(self):
        with self._lock:
            child, self.child = self.child, None
        if child is not None:
            # The child leads its own session: kill whatever the task started too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()

    def stop(self, kill):
        self.closing = True
        if not kill:
            self.join(timeout=5)
        child = self.child
        if child is not None:
            with contextlib.suppress(OSError):
                child.stdin.close()  # a child between tasks exits on EOF
            try:
                child.wait(timeout=0 if kill else 2)
            except subprocess.TimeoutExpired:
                pass
        self.kill_child()


def _spawn_child(config):
    here = os.path.dirname(os.path.abspath(__file__))
    boot = f"import sys; sys.path.insert(0, {here!r}); import castor; castor._child_main()"
    child = subprocess.Popen([sys.executable, "-c", boot, _dumps(config)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             start_new_session=True, env=dict(os.environ, CASTOR_POOL_CHILD="1"))
    ready, _, _ = select.select([child.stdout], [], [], CHILD_START_TIMEOUT)
    line = child.stdout.readline() if ready else b""
    hello = json.loads(line) if line else {"fatal": "no answer from the new process"}
    if "fatal" in hello:
        child.kill()
        child.wait()
        raise CastorError(hello["fatal"])
    return child


def _exit_reason(code):
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _child_config(manager, target, imports):
    """How a child finds the tasks: the worker's MODULE:VARIABLE and imports,
    and where they were found (sys.path may have changed since)."""
    target = target or _locate(manager)
    roots = [_module_root(sys.modules.get(name)) for name in [target.partition(":")[0], *imports]]
    return {"target": target, "imports": list(imports),
            "path": [p for p in [*roots, *sys.path] if p]}


def _module_root(module):
    """The sys.path entry a module was imported from, or None."""
    path = getattr(module, "__file__", None)
    if not path:
        return None
    root = os.path.dirname(os.path.abspath(path))
    depth = module.__name__.count(".") + (os.path.basename(path) == "__init__.py")
    for _ in range(depth):
        root = os.path.dirname(root)
    return root


def _locate(manager):
    """``module:variable`` of an imported manager, for the pool's children."""
    for name, module in list(sys.modules.items()):
        for attr, value in list(vars(module).items()) if module else ():
            if value is manager:
                if name == "__main__":
                    name = _main_module_name() or name
                return f"{name}:{attr}"
    raise CastorError("cannot find the module that holds this manager; "
                      "pass Worker(..., target='module:variable')")


def _child_main():
    """Entry point of a pool child: run jobs from stdin until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # shutdown is the worker's call
    config = json.loads(sys.argv[-1])
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the tasks' prints must not corrupt the replies
    sys.path[:0] = [p for p in config["path"] if p not in sys.path]
    _watch_parent(os.getppid())  # before the user's code, which could hang
    try:
        manager = _load_target(config["target"], config["imports"])
    except BaseException as exc:  # report any import failure to the parent
        replies.write(_dumps({"fatal": f"{type(exc).__name__}: {exc}"}) + "\n")
        replies.flush()
        return
    replies.write('{"ready":true}\n')
    replies.flush()
    for line in sys.stdin.buffer:
        replies.write(_child_reply(manager, line) + "\n")
        replies.flush()


def _child_reply(manager, line):
    """Run one job line in a pool child; always a reply line, whatever happens."""
    try:
        job = json.loads(line)
        task = manager._tasks.get(job["name"])
        if task is None:
            return _dumps({"ok": False, "error": _castor_error(
                f"unknown task {job['name']!r} in the process pool")})
        return _dumps(_execute(task, job["args"], job["kwargs"]))
    except BaseException as exc:
        return _dumps({"ok": False, "error": _castor_error(f"the task crashed castor: {exc!r}")})


def _watch_parent(parent):
    """Exit when the worker is gone, even in the middle of a task."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="castor-watch-parent", daemon=True).start()


# Dashboard ####################################################################
#
# ``castor -i`` in a terminal: the worker runs in the main thread, where its
# signal handlers live, so Ctrl+C behaves exactly as without -i; a daemon
# thread draws the screen a few times a second. Each frame is built as one
# string (cursor home, every line padded to the full width, nothing cleared
# first) and written at once, so nothing flickers, and a task's stray print
# is painted over by the next frame. The numbers come from Manager.counts()
# and the newest few documents, never from a scan of the store.

#: Seconds between two frames.
DASHBOARD_REFRESH = 0.25

#: The completion rate is measured over this many seconds.
RATE_WINDOW = 10.0

#: Log records kept for the Logs panel (more than the tallest screen shows).
LOG_TAIL = 500

#: Width of the Worker Stats panel; Latest Tasks takes the rest.
_STATS_WIDTH = 26

#: Escape sequences: enter (and leave) the alternate screen, hide the cursor.
_SCREEN_ENTER = "\x1b[?1049h\x1b[?25l\x1b[2J"
_SCREEN_LEAVE = "\x1b[?1049l\x1b[?25h"

#: SGR colours of the task statuses in Latest Tasks.
_STATUS_SGR = {"success": "32", "running": "33", "failed": "31",
               "pending": "36", "cancelled": "35"}

#: SGR colours of the log levels in Logs.
_LEVEL_SGR = {"DEBUG": "2", "INFO": "32", "WARNING": "33", "ERROR": "1;31",
              "CRITICAL": "1;31"}

#: What the header says for each Worker.state.
_STATE_TEXT = {"Idle": ("Starting", "36"), "Running": ("Running", "1;32"),
               "Stopping": ("Stopping…", "1;33"), "Stopped": ("Stopped", "1;31")}


def _run_dashboard(worker, target, handler):
    """``castor -i``: the worker in this thread, the dashboard in another."""
    if os.environ.get("TERM") == "dumb":  # no cursor movement to draw with
        logger.info("TERM is dumb: no dashboard, plain logs instead")
        logger.info("Starting server... Ctrl+C to stop.")
        return worker.run()
    dashboard = _Dashboard(worker, target, sys.stdout)
    logger.removeHandler(handler)  # it would scribble over the screen
    logger.addHandler(dashboard.logs)
    try:
        dashboard.open()
        logger.info("Starting server... Ctrl+C to stop.")
        return worker.run()
    finally:
        dashboard.close()
        logger.removeHandler(dashboard.logs)
        logger.addHandler(handler)


class _Dashboard:
    """The screen of ``castor -i``, drawn by a daemon thread."""

    def __init__(self, worker, target, out):
        self.worker, self.target, self.out = worker, target, out
        self.color = not os.environ.get("NO_COLOR")  # https://no-color.org
        self.logs = _LogTail(LOG_TAIL)
        self.rate = _Rate(RATE_WINDOW)
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # a frame is never written after close()
        self._thread = None
        self._undo = []

    def open(self):
        """Take over the terminal and start drawing."""
        atexit.register(self.close)  # even if the interpreter exits under us
        self._undo.append(self._quiet_keyboard())
        self._undo.append(self._watch_resizes())
        self._write(_SCREEN_ENTER)
        self._thread = threading.Thread(target=self._loop, name="castor-dashboard", daemon=True)
        self._thread.start()

    def close(self):
        """Stop drawing and give the terminal back as it was; safe to repeat."""
        atexit.unregister(self.close)
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            with contextlib.suppress(OSError, ValueError):
                self._write(("\x1b[0m" if self.color else "") + _SCREEN_LEAVE)
        while self._undo:
            with contextlib.suppress(Exception):
                self._undo.pop()()
        # Only now that the SIGWINCH handler is gone: one firing inside this
        # set() would wait forever for the lock that set() holds.
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=1)

    def draw(self, now, clock):
        """Read the numbers, build one frame and write it in one go."""
        cols, rows = self._size()
        layout = _Layout(cols, rows)
        view = self._snapshot(layout, now, clock)
        frame = _frame(_render(view, layout, self.color), rows)
        with self._lock:
            if not self._closed.is_set():
                self._write(frame)

    def _loop(self):
        while not self._closed.is_set():
            try:
                self.draw(time.time(), time.monotonic())
            except Exception:  # a bad frame must never take the worker down
                logger.debug("dashboard: could not draw a frame", exc_info=True)
            self._wake.wait(DASHBOARD_REFRESH)
            self._wake.clear()

    def _snapshot(self, layout, now, clock):
        """Everything a frame shows, read once: cheap queries only."""
        manager = self.worker.manager
        counts = manager.counts()  # counters and partial indexes, no scan
        return {
            "version": __version__, "target": self.target, "state": self.worker.state,
            "busy": self.worker.busy(), "counts": counts,
            "rate": self.rate.update(clock, counts["success"] + counts["failed"]),
            "tasks": _latest(manager, layout.body),
            "logs": self.logs.tail(layout.log_rows), "now": now,
        }

    def _size(self):
        # The terminal's own size, not $COLUMNS/$LINES, which go stale on resize.
        try:
            return os.get_terminal_size(self.out.fileno())
        except (AttributeError, ValueError, OSError):
            return os.terminal_size((80, 24))

    def _write(self, text):
        # Bytes, so a terminal that cannot show Λ or … gets "?" instead of a crash.
        buffer = getattr(self.out, "buffer", None)
        if buffer is None:
            self.out.write(text)
        else:
            self.out.flush()
            buffer.write(text.encode(self.out.encoding or "utf-8", "replace"))
        self.out.flush()

    def _quiet_keyboard(self):
        """No echo of keys (^C included) over the screen; keys typed meanwhile
        are dropped on exit rather than handed to the shell."""
        try:
            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd)
        except (AttributeError, ValueError, OSError, termios.error):
            return lambda: None  # stdin is not a terminal: nothing to quiet
        if not _in_foreground(fd):
            return lambda: None  # a background job changing it would be stopped
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO  # lflag; ISIG stays, so Ctrl+C still signals
        termios.tcsetattr(fd, termios.TCSANOW, quiet)

        def restore():
            if _in_foreground(fd):  # not if Ctrl+Z and bg sent us to the background
                termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
        return restore

    def _watch_resizes(self):
        """Redraw at once on SIGWINCH; the handler only sets a flag."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # frames follow the size anyway, 4 times a second
        previous = signal.signal(signal.SIGWINCH, lambda signum, frame: self._wake.set())
        return lambda: signal.signal(signal.SIGWINCH, previous)


def _in_foreground(fd):
    return os.tcgetpgrp(fd) == os.getpgrp()


class _LogTail(logging.Handler):
    """Keeps the latest log records, as (time, level, text), for the Logs panel."""

    def __init__(self, size):
        super().__init__()
        self.lines = collections.deque(maxlen=size)

    def emit(self, record):
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                text += ": " + traceback.format_exception_only(exc)[-1].strip()
            self.lines.append((record.created, record.levelname, text))
        except Exception:
            self.handleError(record)

    def tail(self, n):
        with self.lock:  # emit() runs in the worker's threads
            return list(self.lines)[-n:] if n > 0 else []


class _Rate:
    """Tasks finished per second over the last ``window`` seconds."""

    def __init__(self, window):
        self.window = window
        self.samples = collections.deque()

    def update(self, now, finished):
        """Record the finished count at ``now``; return the recent rate."""
        samples = self.samples
        samples.append((now, finished))
        while len(samples) > 2 and samples[1][0] <= now - self.window:
            samples.popleft()  # keep one sample at or before the window's start
        then, before = samples[0]
        if now <= then:
            return 0.0
        return max(0.0, (finished - before) / (now - then))  # prune lowers counts


def _latest(manager, n):
    """Running tasks first, since a backlog of new pending ones would hide
    them, then the newest of the rest: at most 2n documents read."""
    if n <= 0:
        return []
    running = manager.tasks(status="running", limit=n)
    shown = {doc["id"] for doc in running}
    return (running + [doc for doc in manager.tasks(limit=n) if doc["id"] not in shown])[:n]


class _Layout:
    """Where the panels go on a ``cols`` x ``rows`` screen.

    Eight lines are the header and the borders; the rest is shared by the
    upper panels (``body``) and the logs. Smaller screens are cut, not wrapped.
    """

    def __init__(self, cols, rows):
        self.cols, self.rows = cols, rows
        self.left = min(_STATS_WIDTH, max(0, (cols - 7) // 2))
        self.right = max(0, cols - 7 - self.left)
        room = max(0, rows - 8)
        self.body = max(6, room // 2)  # the stats need six lines
        self.log_rows = max(0, room - self.body)


# Dashboard: drawing ###########################################################
#
# A line is built from segments, (text, SGR colour), and cut or padded to an
# exact width by _fit, counting visible columns: colour codes are added only
# after cutting, so they never count and are never cut in half.


def _render(view, layout, color):
    """The frame's lines, each exactly ``layout.cols`` columns wide."""
    cols = layout.cols
    if cols < 12:  # too narrow for panels: say what this is, at least
        return [_fit([("castor", "1")], cols, color)]
    return ([_fit(_header(view, cols), cols, color)]
            + _upper_panels(view, layout, color)
            + _logs_panel(view, layout, color)
            + [_fit([(_bottom_rule(view["state"], cols), "")], cols, color)])


def _upper_panels(view, layout, color):
    """Worker Stats and Latest Tasks side by side, with their borders."""
    left, right = layout.left, layout.right
    rule = _fit([("+" + "-" * (left + 2) + "+" + "-" * (right + 2) + "+", "")], layout.cols, color)
    titles = _pair([(_center("Worker Stats", left), "1")],
                   [(_center("Latest Tasks", right), "1")], layout, color)
    stats = _stats_rows(view)
    tasks = [_task_row(doc, view["now"], right) for doc in view["tasks"]]
    body = [_pair(stats[i] if i < len(stats) else [], tasks[i] if i < len(tasks) else [],
                  layout, color) for i in range(layout.body)]
    return [rule, titles, rule] + body


def _logs_panel(view, layout, color):
    """The latest log lines, newest at the bottom, under their title."""
    rule = _fit([("+" + "-" * max(0, layout.cols - 2) + "+", "")], layout.cols, color)
    rows = [_log_row(entry) for entry in view["logs"]]
    rows = [[]] * (layout.log_rows - len(rows)) + rows
    return [rule, _wide([("Logs (UTC)", "1")], layout.cols, color), rule] + [
        _wide(row, layout.cols, color) for row in rows]


def _frame(lines, rows):
    """One write: cursor home, the lines over the old ones, the rest cleared.

    Lines are already full width, so no erase is needed after them; and
    erasing after a line that reaches the last column would wipe its last
    character on many terminals.
    """
    lines = lines[:rows]
    tail = "\r\n\x1b[J" if len(lines) < rows else ""
    return "\x1b[H" + "\r\n".join(lines) + tail


def _pair(left_row, right_row, layout, color):
    """A line of the two upper panels: Worker Stats | Latest Tasks."""
    return ("| " + _fit(left_row, layout.left, color) + " | "
            + _fit(right_row, layout.right, color) + " |")


def _wide(row, cols, color):
    return "| " + _fit(row, max(0, cols - 4), color) + " |" if cols >= 4 else _fit(row, cols, color)


def _header(view, cols):
    state, sgr = _STATE_TEXT.get(view["state"], (view["state"], ""))
    head = [(" C Λ S T O R", "1"), (f" v{view['version']}", "2"), (" | Manager: ", "")]
    tail = [(" | Status: ", ""), (state, sgr)]
    # The target gives way first, so the status shows on any width.
    room = cols - _width("".join(text for text, _ in head + tail))
    if room < 4:
        return head[:2] + tail
    return head + [(_ellipsize(view["target"], room), "")] + tail


def _bottom_rule(state, cols):
    hint = " Ctrl+C again: exit now " if state == "Stopping" else " Ctrl+C: stop "
    if cols < 2 + _width(hint) + 4:
        return "+" + "-" * max(0, cols - 2) + "+"
    return "+--" + hint + "-" * (cols - 4 - _width(hint)) + "+"


def _stats_rows(view):
    counts, busy = view["counts"], view["busy"]
    return [
        [("Process Tasks: ", ""), ("%d / %d" % busy["process"], "1;32")],
        [("Thread Tasks:  ", ""), ("%d / %d" % busy["thread"], "1;32")],
        [("Pending Queue: ", ""), (f"{counts['pending']:,}", "1;36")],
        [("Total Done:    ", ""), (f"{counts['success']:,}", "1")],
        [("Failed:        ", ""), (f"{counts['failed']:,}", "1;31" if counts["failed"] else "1")],
        [("Rate:          ", ""), (f"{view['rate']:.1f} tasks/s", "1")],
    ]


def _task_row(doc, now, width):
    """``c4a3f2b1 SUCCESS   tasks.send_email   0.02s``, fitted to ``width``."""
    status = str(doc.get("status"))
    name_room = max(0, width - 27)  # id 8, status 9, duration 7, 3 spaces
    return [(str(doc.get("id"))[:8], "2"), (" ", ""),
            (status.upper().ljust(9), _STATUS_SGR.get(status, "")), (" ", ""),
            (_short_name(str(doc.get("task_name")), name_room).ljust(name_room), ""),
            (" " + _duration(doc, now).rjust(7), "")]


def _short_name(name, room):
    """The full task name, or just the function's name when that is too long."""
    if _width(name) > room:
        name = name.rsplit(".", 1)[-1]
    return _ellipsize(name, room)


def _duration(doc, now):
    """How long the task ran, or has been running; blank if it never started."""
    try:
        started = _parse_iso(doc["started_at"])
        ended = _parse_iso(doc["finished_at"]) if doc.get("finished_at") else now
    except (KeyError, TypeError, ValueError):
        return ""
    if doc.get("status") not in ("running", "success", "failed"):
        return ""
    seconds = max(0.0, ended - started)
    if seconds < 60:
        return f"{seconds:.2f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _log_row(entry):
    created, level, text = entry
    clock = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).strftime("%H:%M:%S")
    return [(clock + " ", "2"), (level.ljust(8), _LEVEL_SGR.get(level, "")), (text, "")]


def _center(text, width):
    return text.center(width) if _width(text) <= width else text


# Dashboard: text width ########################################################


def _fit(segments, width, color):
    """Segments as exactly ``width`` columns: cut with "…", or padded."""
    if width <= 0:
        return ""
    segments = [(_clean(text), sgr) for text, sgr in segments]
    overflow = sum(_width(text) for text, _ in segments) > width
    room = width - 1 if overflow else width  # one column for the "…"
    parts, used = [], 0
    for text, sgr in segments:
        piece = _cut(text, room - used)
        used += _width(piece)
        if piece:
            parts.append(f"\x1b[{sgr}m{piece}\x1b[0m" if color and sgr else piece)
    if overflow:
        parts.append("…")
        used += 1
    return "".join(parts) + " " * (width - used)


def _ellipsize(text, width):
    """``text`` cut to ``width`` columns, ending in "…" if it was longer."""
    if _width(text) <= width:
        return text
    return _cut(text, width - 1) + "…" if width > 0 else ""


def _cut(text, width):
    """The longest start of ``text`` that takes at most ``width`` columns."""
    if text.isascii():
        return text[:max(0, width)]
    used = 0
    for i, char in enumerate(text):
        used += _char_width(char)
        if used > width:
            return text[:i]
    return text


def _width(text):
    """Columns ``text`` takes on a terminal (wide Asian characters take two)."""
    return len(text) if text.isascii() else sum(_char_width(c) for c in text)


def _char_width(char):
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _clean(text):
    """No control characters on the screen: a task's data could move the cursor."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else " " for c in text)


# CLI ##########################################################################


def _load_target(target, imports=()):
    """Import ``module:variable`` (then ``imports``) and return the Manager."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise _UsageError(f"expected MODULE:VARIABLE (like main:manager), got {target!r}")
    module = _import(module_name)
    for extra in imports:
        _import(extra)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _UsageError(f"module {module_name!r} has no variable {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Manager):
        raise _UsageError(f"{target} is a {type(obj).__name__}, not a castor.Manager")
    return obj


def _import(name):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise _UsageError(f"no module named {name!r} (run castor from the "
                              "directory that holds it)") from None
        raise


def _parser():
    parser = _OneLineParser(
        prog="castor", description="Run a castor worker for MODULE:VARIABLE (a Manager).")
    parser.add_argument("target", metavar="MODULE:VARIABLE", help="e.g. main:manager")
    parser.add_argument("--workers", type=_count, default=None,
                        help="processes for mode='process' tasks (default: CPU count)")
    parser.add_argument("--threads", type=_count, default=None,
                        help="threads for mode='thread' tasks (default: workers * 2)")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="also import MODULE to register its tasks")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="show a live dashboard in the terminal")
    parser.add_argument("--version", action="version", version=f"castor {__version__}")
    return parser


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"castor: error: {message} (see castor --help)\n")


def _count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _setup_logging():
    # The CLI owns this process's logging: skip what a log line does not show
    # (caller, thread, process), which costs more than the line itself.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = _BatchingHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


class _Formatter(logging.Formatter):
    """``2026-11-22 08:39:06,226 INFO    message``, the clock cached per second."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)-7s %(message)s")

    def formatTime(self, record, datefmt=None):
        return f"{_local_seconds(int(record.created))},{int(record.msecs):03d}"


@functools.lru_cache(maxsize=64)
def _local_seconds(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


class _BatchingHandler(logging.StreamHandler):
    """Writes lines in batches, at most LOG_FLUSH_INTERVAL late: a busy worker
    logs thousands of lines a second, and a flush (a system call) per line
    costs more than the line. Warnings and errors go out at once."""

    def __init__(self, stream):
        super().__init__(stream)
        self._lines = []
        self._waiting = threading.Event()  # lines are waiting: an idle worker never wakes
        self._flusher = threading.Thread(target=self._flush_forever, name="castor-log",
                                         daemon=True)
        self._flusher.start()
        atexit.register(self.flush)

    def emit(self, record):
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        with self.lock:
            self._lines.append(line)
        if record.levelno >= logging.WARNING:
            self.flush()
        else:
            self._waiting.set()

    def flush(self):
        with self.lock:
            lines, self._lines = self._lines, []
            if lines and self.stream:
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write("".join(lines))
                    self.stream.flush()

    def _flush_forever(self):
        while True:
            self._waiting.wait()
            time.sleep(LOG_FLUSH_INTERVAL)  # let a burst of lines gather
            self._waiting.clear()
            self.flush()


def main(argv=None):
    """``castor [--workers N] [--threads M] [-i] MODULE:VARIABLE``."""
    args = _parser().parse_args(argv)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like python -m: the project is importable
    try:
        manager = _load_target(args.target, args.imports)
    except _UsageError as exc:
        sys.stderr.write(f"castor: error: {exc}\n")
        return 2
    worker = Worker(manager, args.workers, args.threads, target=args.target,
                    imports=args.imports)
    handler = _setup_logging()
    if args.interactive and sys.stdout.isatty():
        return _run_dashboard(worker, args.target, handler)
    if args.interactive:
        logger.info("stdout is not a terminal: no dashboard, plain logs instead")
    logger.info("Starting server... Ctrl+C to stop.")
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
