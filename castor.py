"""Castor: background tasks for small Python apps, on one beaver-db file.

Decorate a function, call ``.delay()``, wait on the handle, and run a worker
with ``castor main:manager``. The application and the workers talk only
through the SQLite file of a beaver-db database: no Redis, no broker. Castor
needs only the standard library and beaver-db, and this file can be copied
into a project as it is. For workers on several hosts, give the Manager a
PostgreSQL connection string instead (that store needs psycopg 3).

    from beaver import BeaverDB
    from castor import Manager
    manager = Manager(BeaverDB("tasks.db"))
    @manager.task(mode="thread")
    def send_email(to): ...
    send_email.delay("alice@example.com").join(timeout=5)

Licence: MIT.
"""

__version__ = "1.0.0"
__author__ = "The castor developers"
__license__ = "MIT"

__all__ = [
    "Cancelled",
    "CastorError",
    "Manager",
    "NotJSONError",
    "PayloadTooLarge",
    "StoreError",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskHandle",
    "UnknownTaskError",
    "Worker",
    "current_task",
    "main",
]

import atexit
import collections
import contextlib
import contextvars
import datetime
import functools
import json
import logging
import math
import os
import queue
import random
import re
import select
import signal
import sqlite3
import sys
import threading
import time
import traceback

# Imported where they are used, to keep ``import castor`` cheap: argparse,
# asyncio, ctypes, hashlib, html, importlib, inspect, socket, subprocess,
# termios, unicodedata, uuid, zoneinfo, wsgiref, and psycopg (PostgreSQL only).


def _own_name():
    """The name this module is imported as: ``castor``, or ``pkg.vendor.castor``."""
    spec = globals().get("__spec__")
    if spec is not None and spec.name not in ("__main__", "__mp_main__"):
        return spec.name
    return "castor" if __name__ == "__main__" else __name__


if __name__ == "__main__":
    # Running this file (python -m castor, python -m pkg.vendor.castor) must not
    # import it a second time when the user's module imports it by that name.
    sys.modules.setdefault(_own_name(), sys.modules["__main__"])


# Logger and constants #########################################################

logger = logging.getLogger("castor")
logger.addHandler(logging.NullHandler())

#: Statuses a task can be in; the last three are final.
STATUSES = ("pending", "running", "success", "failed", "cancelled")

#: Statuses after which a task changes only when someone re-drives it.
FINISHED = frozenset(("success", "failed", "cancelled"))

#: Execution modes a task must choose between.
MODES = ("thread", "process", "async")

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

#: Workers' clocks may differ by this much (periodic slots are kept in the
#: firing worker's clock): a stored slot further ahead than the schedule
#: puts one, by more than this, is an older schedule's and is replaced.
SCHEDULE_SKEW = 60.0

#: The default largest task document (arguments) or result, in bytes of JSON.
MAX_PAYLOAD = 16 * 1024 * 1024

#: While a backlog drains, how long a worker waits for more running tasks to
#: finish so that one commit records them all (group commit).
GROUP_COMMIT_WINDOW = 0.001

#: The CLI writes its log lines at most this many seconds after the event.
LOG_FLUSH_INTERVAL = 0.05

#: Where the store offers nothing to sleep on, how often an idle worker looks.
IDLE_POLL = 0.002

#: SQLite busy timeout: a file write-locked by someone else is waited for.
BUSY_TIMEOUT = 60.0

#: After a write, how long a process's checkpoint thread lets more gather.
CHECKPOINT_DELAY = 0.2

#: A WAL longer than this (in pages) after a checkpoint is copied back in
#: full, so that the next write starts it over (see _checkpoint) ...
WAL_RESTART_PAGES = 4000

#: ... writers held off only once a checkpoint found fewer new pages than this ...
CATCH_UP_PAGES = 256

#: ... and only if the write lock is free within this many seconds: the
#: thread waits its turn in Python, for a core and for the GIL.
RESTART_PATIENCE = 0.02

#: A WAL file that grew past this many bytes in a burst of writes is cut back
#: to it when the WAL starts over (SQLite otherwise keeps the file's size).
WAL_SIZE_LIMIT = 64 << 20

#: How long the CLI keeps retrying to import the app while a brand-new
#: database file is "locked" by another process switching it to WAL.
OPEN_RETRY_TIMEOUT = 30.0

#: Seconds a new process-pool child may take to import the user's modules.
CHILD_START_TIMEOUT = 120.0

#: Progress reports are written to the store at most this often per task.
PROGRESS_INTERVAL = 0.5

#: A running task's cancel request is looked for this often.
CANCEL_CHECK_INTERVAL = 0.5

#: Default number of ``mode="async"`` tasks a worker runs at once.
ASYNC_TASKS = 100

#: An event loop that has not run a callback for this long is blocked.
LOOP_BLOCKED_AFTER = 1.0

#: After a store error, the worker waits this long, doubling up to the second.
STORE_BACKOFF = (0.25, 5.0)


# Exceptions ###################################################################


class CastorError(Exception):
    """Base class of every error castor raises itself."""


class TaskError(CastorError):
    """A task failed with an exception that cannot be rebuilt here."""

    def __init__(self, message, type_name=None, traceback=None):
        super().__init__(message)
        self.type_name = type_name
        self.traceback = traceback


class Cancelled(TaskError):
    """The task was cancelled (``join`` raises it; so does ``check_cancelled``)."""


class NotJSONError(CastorError, TypeError):
    """An argument or result is not JSON."""


class PayloadTooLarge(CastorError, ValueError):
    """Arguments or a result larger than the manager's ``max_payload``."""


class StoreError(CastorError):
    """The store cannot be used: a full disk, a lost server, a file gone."""


class _StoreGone(StoreError):
    """The store's file was deleted or replaced: a worker must exit."""


class _Unstorable(StoreError):
    """PostgreSQL refused a value (jsonb takes no NUL and no lone surrogate)."""


class UnknownTaskError(CastorError, KeyError):
    """No task with this id is in the store."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class _UsageError(CastorError):
    """A command-line mistake: reported in one line, exit status 2."""


class _OpenFailed(CastorError):
    """The app's database stayed locked while the CLI tried to open it."""


# Public API: Manager ##########################################################


class Manager:
    """Holds the store and the registry of tasks.

    ``Manager(BeaverDB("tasks.db"))`` keeps everything in that file;
    ``Manager("postgresql://user@host/db")`` in PostgreSQL, for workers on
    several hosts. ``Manager(db, immediate=True)`` runs tasks inline at
    ``.delay()``, for testing an application without a worker.
    """

    #: Lets the CLI of another copy of castor recognise a Manager of this one.
    _castor_manager = True

    def __init__(self, db, *, immediate=False, max_payload=MAX_PAYLOAD):
        self.db = db
        self.immediate = bool(immediate)
        self.max_payload = _int(max_payload, "max_payload")
        if self.max_payload < 1:
            raise ValueError(f"max_payload must be 1 byte or more, not {max_payload}")
        self._store = _open_store(db)
        self.path = self._store.name  # what logs and screens show; never a password
        self._tasks = {}

    def __repr__(self):
        return f"<castor.Manager {self.path!r} tasks={len(self._tasks)}>"

    def task(self, mode, *, daemon=False, retries=0, retry_delay=1.0, timeout=None,
             priority=0, every=None, cron=None, tz=None, unique=False, concurrency=None):
        """Decorator: register a function as a background task."""
        options = _task_options(mode, daemon=daemon, retries=retries,
                                retry_delay=retry_delay, timeout=timeout, priority=priority,
                                every=every, cron=cron, tz=tz, unique=unique,
                                concurrency=concurrency)

        def decorator(func):
            task = Task(self, func, **options)
            known = self._tasks.get(task.name)
            if known is not None and known.func is not func and "<locals>" in task.name:
                # A worker finds tasks by name: it would run one for the other.
                raise ValueError(
                    f"another function is already registered as task {task.name!r}: functions "
                    "made inside another function share their name (a decorator without "
                    "functools.wraps, say); give each its own with functools.wraps")
            self._tasks[task.name] = task
            return task
        return decorator

    def get_task_by_id(self, task_id):
        """The handle of an existing task, or None for an unknown id."""
        if not isinstance(task_id, str):
            return None
        doc = self._store.get(task_id)
        return None if doc is None else TaskHandle(self, task_id, doc.get("task_name"))

    def tasks(self, status=None, limit=50, *, name=None, offset=0):
        """Task documents, newest first, optionally of one status and task name."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        return self._store.list(status, name, _row_count(limit, "limit"),
                                _row_count(offset, "offset"))

    def counts(self):
        """``{"pending": n, "running": n, "success": n, ...}`` without a scan."""
        return self._store.counts()

    def prune(self, older_than):
        """Delete finished tasks older than ``older_than`` seconds; return how many."""
        seconds = _seconds(older_than, "older_than")
        return self._store.prune(time.time() - seconds)

    def requeue(self, status="failed", name=None):
        """Re-drive every ``failed`` (or ``cancelled``) task, of one name if
        given, in one transaction; return how many went back to pending."""
        if status not in ("failed", "cancelled"):
            raise ValueError(f"requeue takes status 'failed' or 'cancelled', not {status!r}")
        ids = self._store.requeue(None, status, name, time.time())
        self._run_requeued(ids)
        return len(ids)

    def _run_requeued(self, ids):
        """Immediate mode: tasks just made pending again run here and now (a
        task this registry does not know stays pending, for a worker)."""
        if not self.immediate:
            return
        for task_id in ids:
            doc = self._store.get(task_id)
            task = self._tasks.get(doc.get("task_name")) if doc is not None else None
            if task is not None:
                self._store.finish_pending(task._run_attempts(doc))

    def workers(self):
        """The live workers: id, host, pid, started, heartbeat, pools."""
        return self._store.workers()

    def periodic(self):
        """The periodic and cron tasks of this registry, with their next run."""
        due = self._store.periodic()
        return [{"name": task.name, "schedule": task.schedule_text(),
                 "next_run": _iso(due[task.name]) if task.name in due else None}
                for task in self._tasks.values() if task.periodic]

    def close(self):
        """Let go of the store's connections (they open again if used)."""
        self._store.close()

    def wsgi_app(self, *, auth=None):
        """The web view as a WSGI application (see ``castor web``)."""
        return _WebApp(self, auth=auth)

    @property
    def registry(self):
        """Registered tasks by name (a copy)."""
        return dict(self._tasks)


# Public API: Task #############################################################


class Task:
    """A registered function. Call it to run it here; ``.delay()`` to queue it."""

    def __init__(self, manager, func, *, mode, daemon=False, retries=0, retry_delay=1.0,
                 timeout=None, priority=0, every=None, cron=None, unique=False,
                 concurrency=None):
        _check_function(func, mode, periodic=every is not None or cron is not None)
        functools.update_wrapper(self, func)
        self.manager, self.func = manager, func
        self.name = _task_name(func)
        self.mode, self.daemon = mode, daemon
        self.retries, self.retry_delay = retries, retry_delay
        self.timeout, self.priority = timeout, priority
        self.every, self.cron = every, cron
        self.unique, self.concurrency = unique, concurrency

    def __repr__(self):
        return f"<castor.Task {self.name} mode={self.mode}>"

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)  # an async def gives its coroutine

    def __get__(self, obj, objtype=None):
        # Tasks are plain functions; they never bind to an instance.
        return self

    @property
    def periodic(self):
        return self.every is not None or self.cron is not None

    def schedule_text(self):
        """``every 300s`` or ``cron 0 9 * * mon-fri (Europe/Paris)``; None if not periodic."""
        if self.every is not None:
            return f"every {self.every:g}s"
        return None if self.cron is None else f"cron {self.cron}"

    def delay(self, *args, **kwargs):
        """Queue the task to run now. Returns a TaskHandle."""
        return self.schedule(args, kwargs)

    def schedule(self, args=(), kwargs=None, *, delay=None, at=None, priority=None):
        """Queue the task to run no earlier than ``delay`` seconds or ``at``."""
        now = time.time()
        eta = _eta(now, delay, at)
        prio = self.priority if priority is None else _priority(priority)
        if not isinstance(args, (tuple, list)):  # "abc" would be three arguments
            raise TypeError(f"args must be a tuple or a list, not {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
        new = self._new(tuple(args), dict(kwargs or {}), now, eta, prio)
        if self.manager.immediate:
            self.manager._store.check_storable(new.raw, f"the arguments of {self.name}")
            return self._run_inline(new.doc)
        return self._handles(self.manager._store.enqueue([new]))[0]

    def map(self, iterable):
        """Queue one task per item, all in one transaction."""
        if self.manager.immediate:
            return [self.schedule(_as_args(item)) for item in iterable]
        batch = [_as_args(item) for item in iterable]
        return self._handles(self.manager._store.enqueue_batch(_Batch(self, time.time()), batch))

    def _handles(self, ids):
        return [TaskHandle(self.manager, task_id, self.name) for task_id in ids]

    def _new(self, args, kwargs, now, eta, priority, stamp=None):
        """A new task, its document checked (JSON, size) and serialized."""
        doc = {
            "id": _new_id(), "task_name": self.name, "status": "pending",
            "args": list(args), "kwargs": kwargs,
            "enqueued_at": stamp or _iso(now), "started_at": None, "finished_at": None,
            "result": None, "error": None, "exception": None,
            "mode": self.mode, "priority": priority,
            "eta": _iso(eta) if eta > now else None,
            "attempts": 0, "retries": self.retries, "losses": 0, "worker": None,
            "progress": None,
        }
        where = f"the arguments of {self.name}"
        raw = _to_json(doc, where)
        _check_keys(args, where)
        _check_keys(kwargs.values(), where)
        self._check_size(raw, doc)
        return _NewTask(doc, raw, eta, self._unique_key(args, kwargs))

    def _check_size(self, raw, doc):
        if len(raw) > self.manager.max_payload:
            size = len(_dumps([doc["args"], doc["kwargs"]]))
            raise PayloadTooLarge(f"the arguments of {self.name} are {size:,} bytes of JSON, "
                                  f"which make a task document of {len(raw):,}, over the "
                                  f"limit of {self.manager.max_payload:,} "
                                  "(Manager(max_payload=...))")

    def _unique_key(self, args, kwargs):
        """The key that makes a pending or running task "the same", or None."""
        if self.unique is False:
            return None
        if callable(self.unique):
            key = self.unique(*args, **kwargs)
        else:
            args, kwargs = self._canonical_call(args, kwargs)
            key = [args, dict(sorted(kwargs.items()))]  # keywords in name order
        import hashlib
        text = _to_json([self.name, key], f"the unique key of {self.name}")
        return hashlib.sha256(text.encode()).hexdigest()

    def _canonical_call(self, args, kwargs):
        """One form for one call: f(1, b=2), f(a=1, b=2) and f(b=2, a=1) are all
        (1, 2), {}. Defaults are not filled in. A call the function's signature
        refuses (it will fail when it runs) keeps the form it was given."""
        import inspect
        try:
            bound = inspect.signature(self.func).bind(*args, **kwargs)
        except (TypeError, ValueError):
            return args, kwargs
        return bound.args, bound.kwargs

    def _run_inline(self, doc):
        """Immediate mode: run now, retries included, and store the outcome."""
        # The function sees JSON, as in a worker, and refuses what a worker would.
        doc = self._run_attempts(json.loads(_dumps(doc)))
        self.manager._store.put_finished(doc)
        return TaskHandle(self.manager, doc["id"], self.name)

    def _run_attempts(self, doc):
        """Immediate mode: the task's attempts, back to back; its finished document."""
        for attempt in range(1, self.retries + 2):
            doc.update(attempts=attempt, started_at=_iso(time.time()))
            reply = _run_inline_attempt(self, doc)
            if reply["ok"] or reply.get("cancelled"):
                break
        _finish_doc(doc, reply, time.time())
        return doc


class _Batch:
    """Makes the tasks of one .map(): their documents differ only by id and
    arguments, so only those are encoded for each; the rest is encoded once."""

    def __init__(self, task, now):
        self.task, self.now = task, now
        self.proto = task._new((), {}, now, now, task.priority, _iso(now)).doc
        marked = _dumps(dict(self.proto, id=_MARK_ID, args=_MARK_ARGS))
        self.before, rest = marked.split(_dumps(_MARK_ID))
        self.middle, self.after = rest.split(_dumps(_MARK_ARGS))
        self.where = f"the arguments of {task.name}"
        self.unique = task.unique is not False

    def __call__(self, args):
        doc = dict(self.proto, id=_new_id(), args=list(args))
        encoded = _to_json(doc["args"], self.where)
        _check_keys(args, self.where)
        raw = f'{self.before}"{doc["id"]}"{self.middle}{encoded}{self.after}'
        self.task._check_size(raw, doc)
        return _NewTask(doc, raw, self.now, self.task._unique_key(args, {}))


#: Stand-ins that no real value encodes to, marking where a batch's documents differ.
_MARK_ID, _MARK_ARGS = "\0castor-id\0", "\0castor-args\0"


class _NewTask:
    """A task on its way into the store."""

    __slots__ = ("doc", "raw", "eta", "unique_key")

    def __init__(self, doc, raw, eta, unique_key):
        self.doc, self.raw, self.eta, self.unique_key = doc, raw, eta, unique_key


# Public API: TaskHandle #######################################################


class TaskHandle:
    """A queued task: its id, status and result. True once it has finished."""

    __slots__ = ("manager", "id", "name")

    def __init__(self, manager, task_id, name=None):
        self.manager = manager
        self.id = task_id
        self.name = name

    def __repr__(self):
        return f"<TaskHandle {self.id} {self.name}>"

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

    def progress(self):
        """The task's last progress report, ``{"done", "total", "message", "at"}``, or None."""
        return self._doc().get("progress")

    def cancel(self):
        """Stop the task: a pending one never runs, a running one is stopped.

        True if it was pending or running, False if it had already finished.
        """
        return self.manager._store.cancel(self.id, time.time())

    def retry(self):
        """Run a failed or cancelled task again; False if it has not finished
        (or succeeded). Its previous error stays in the document's history.
        In immediate mode it runs again here and now."""
        ids = self.manager._store.requeue([self.id], None, None, time.time())
        self.manager._run_requeued(ids)
        return bool(ids)

    def join(self, timeout=None):
        """Wait for the result; raise TimeoutError or the task's exception."""
        waiter = _Waiter(self, timeout)
        while (doc := waiter.finished()) is None:
            time.sleep(waiter.pause())
        return _result_of(doc)

    async def resolve(self, timeout=None):
        """``join`` for asyncio: waits without blocking the event loop."""
        import asyncio
        waiter = _Waiter(self, timeout)
        while (doc := waiter.finished()) is None:
            await asyncio.sleep(waiter.pause())
        return _result_of(doc)

    def _doc(self):
        doc = self.manager._store.get(self.id)
        if doc is None:
            raise UnknownTaskError(f"no task {self.id!r} in the store (pruned?)")
        return doc


class _Waiter:
    """Polls a task until it finishes, cheaply: the store's version changes
    only when someone commits, so most polls read no document."""

    def __init__(self, handle, timeout):
        self.handle, self.timeout = handle, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.seen, self.step = None, 0.0005

    def finished(self):
        """The finished document, or None; TimeoutError past the deadline."""
        version = self.handle.manager._store.version()
        if version is None or version != self.seen:
            self.seen, doc = version, self.handle._doc()
            if doc["status"] in FINISHED:
                return doc
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise TimeoutError(f"task {self.handle.id} did not finish within {self.timeout}s")
        return None

    def pause(self):
        self.step = min(self.step * 1.2, 0.02)
        if self.deadline is None:
            return self.step
        return max(0.0, min(self.step, self.deadline - time.monotonic()))


# Public API: inside a task ####################################################

_CURRENT = contextvars.ContextVar("castor_current_task", default=None)


def current_task():
    """The running task's TaskContext inside a task; None anywhere else."""
    return _CURRENT.get()


class TaskContext:
    """What a running task knows of itself: ``castor.current_task()``."""

    __slots__ = ("id", "name", "attempt", "_progress", "_dirty", "_cancel", "_report")

    def __init__(self, task_id, name, attempt, report=None):
        self.id, self.name, self.attempt = task_id, name, attempt
        self._progress, self._dirty = None, False
        self._cancel = False  # set by the worker; a plain flag is enough under the GIL
        self._report = report  # process children send progress to their worker

    def __repr__(self):
        return f"<castor.TaskContext {self.id} {self.name} attempt={self.attempt}>"

    def progress(self, done, total=None, message=""):
        """Report how far the task got; cheap enough for a tight loop."""
        for value, what in ((done, "done"), (total, "total")):
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not math.isfinite(value)):
                raise TypeError(f"progress {what} must be a number, not {value!r}")
        self._progress = {"done": done, "total": total, "message": str(message)[:1000],
                          "at": _iso(time.time())}
        self._dirty = True
        if self._report is not None:
            self._report(self)

    @property
    def cancelled(self):
        """True once someone asked for this task to stop."""
        return self._cancel

    def check_cancelled(self):
        """Raise ``castor.Cancelled`` if someone asked for this task to stop."""
        if self._cancel:
            raise Cancelled(f"task {self.id} was cancelled", "castor.Cancelled")

    def _take_progress(self):
        """The latest report if it changed since the last take, else None."""
        if not self._dirty:
            return None
        self._dirty = False
        return self._progress


# Helpers of the public API ####################################################


def _task_options(mode, *, daemon, retries, retry_delay, timeout, priority, every, cron,
                  tz, unique, concurrency):
    """Check decorator arguments when the decorator is applied."""
    if callable(mode):
        raise TypeError("@manager.task needs a mode: @manager.task(mode='thread')")
    if mode not in MODES:
        raise ValueError(f"mode must be 'thread', 'process' or 'async', not {mode!r}")
    if not isinstance(daemon, bool):
        raise TypeError(f"daemon must be True or False, not {daemon!r}")
    if not (isinstance(unique, bool) or callable(unique)):
        raise TypeError(f"unique must be True, False or a function of the arguments, "
                        f"not {unique!r}")
    return dict(
        mode=mode, daemon=daemon, retries=_at_least(retries, 0, "retries"),
        retry_delay=_seconds(retry_delay, "retry_delay"),
        timeout=None if timeout is None else _positive(timeout, "timeout"),
        priority=_priority(priority),
        every=None if every is None else _positive(every, "every"),
        cron=_cron_option(cron, tz, every), unique=unique,
        concurrency=None if concurrency is None else _at_least(concurrency, 1, "concurrency"),
    )


def _cron_option(cron, tz, every):
    if cron is None:
        if tz is not None:
            raise TypeError("tz= goes with cron=; give a cron expression too")
        return None
    if every is not None:
        raise TypeError("give every= or cron=, not both")
    if not isinstance(cron, str):
        raise TypeError(f"cron must be a string like '0 9 * * mon-fri', not {cron!r}")
    return _Cron(cron, "UTC" if tz is None else tz)


def _check_function(func, mode, periodic):
    """What only the function itself can tell: async or not, its arguments."""
    import inspect
    if not callable(func):
        raise TypeError(f"@manager.task decorates functions, not {func!r}")
    is_async = inspect.iscoroutinefunction(func)
    if is_async and mode != "async":
        raise TypeError(f"{func.__qualname__} is an async def: use @manager.task(mode='async')")
    if mode == "async" and not is_async:
        raise TypeError(f"mode='async' takes an async def, and {func.__qualname__} is a plain "
                        "function: use mode='thread' or mode='process'")
    if periodic:
        try:
            inspect.signature(func).bind()
        except TypeError:
            raise ValueError(f"a periodic task ({func.__qualname__}) must take no "
                             "arguments") from None


def _int(value, what):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {value!r}")
    return value


def _priority(value):
    """A priority: an int PostgreSQL's integer column holds (as SQLite does)."""
    if not -2 ** 31 <= _int(value, "priority") < 2 ** 31:
        raise ValueError(f"priority must be from -2**31 to 2**31 - 1, not {value}")
    return value


def _no_task_has(text):
    """Whether ``text`` holds a NUL character or a lone surrogate: no task id
    or name does (PostgreSQL's text and SQLite's UTF-8 cannot even be asked
    about a lone surrogate), so a lookup finds nothing rather than failing."""
    if "\0" in text:
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _findable(ids, name):
    """A re-drive's ``ids`` less those no task has, and whether it can find
    anything at all (see _no_task_has)."""
    if ids is not None:
        ids = [task_id for task_id in ids if not _no_task_has(task_id)]
    return ids, ids != [] and (name is None or not _no_task_has(name))


def _row_count(value, what):
    """A row count or offset: an int both stores' integers hold."""
    if not 0 <= _int(value, what) < 2 ** 63:
        raise ValueError(f"{what} must be from 0 to 2**63 - 1, not {value}")
    return value


def _at_least(value, low, what):
    if _int(value, what) < low:
        raise ValueError(f"{what} must be {low} or more, not {value}")
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
    module = getattr(func, "__module__", None) or "__main__"
    if module == "__main__":
        module = _main_module_name() or module
    return f"{module}.{getattr(func, '__qualname__', type(func).__name__)}"


def _main_module_name():
    """What ``python main.py`` would be called if imported: ``main``."""
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", "__mp_main__"):
        return spec.name
    path = getattr(main_module, "__file__", None)
    return os.path.splitext(os.path.basename(path))[0] if path else None


def _open_store(db):
    """The store behind what the user gave Manager."""
    if isinstance(db, str) and db.startswith(("postgresql://", "postgres://")):
        return _PostgresStore(db)
    return _SqliteStore(_db_path(db))


def _db_path(db):
    """The file behind a BeaverDB or AsyncBeaverDB (castor opens it directly)."""
    engine = getattr(db, "_async_db", db)
    path = getattr(engine, "_db_path", None)
    if not isinstance(path, str):
        # Never the value itself: a mistyped connection string holds a password.
        what = "a string that does not start with postgresql://" if isinstance(db, str) \
            else f"a {type(db).__name__}"
        raise TypeError(f"Manager needs a local beaver.BeaverDB or a 'postgresql://' "
                        f"connection string, not {what}")
    if path == ":memory:" or path.startswith("file::memory:"):
        raise CastorError("castor needs a database file: an in-memory database "
                          "cannot be shared with a worker")
    # The real file: inotify must watch the directory SQLite writes the WAL in.
    return os.path.realpath(path)


def _new_id():
    """A random (version 4) UUID string. By hand: uuid.uuid4() costs twice as
    much, and .map() makes thousands."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _refuse(obj):
    raise NotJSONError(f"{obj!r} (type {type(obj).__name__})")


def _make_encoder():
    """value -> compact JSON, by the C encoder behind json.dumps, made once:
    JSONEncoder.encode makes a new one at every call, which costs more than
    encoding a small document. It has no cycle check, whose bookkeeping would
    be shared by threads: a value that contains itself ends in RecursionError."""
    from json import encoder
    try:
        encode = encoder.c_make_encoder(None, _refuse, encoder.encode_basestring_ascii, None,
                                        ":", ",", False, False, False)
    except TypeError:  # no C accelerator, or a signature this Python changed
        return json.JSONEncoder(allow_nan=False, separators=(",", ":"), default=_refuse,
                                check_circular=False).encode
    return lambda value: "".join(encode(value, 0))


_encode = _make_encoder()


def _dumps(value):
    """JSON of a value castor built itself (already known to be JSON)."""
    return _encode(value)


def _to_json(value, where):
    """``value`` as compact JSON, refusing what JSON cannot carry and naming it."""
    try:
        return _encode(value)
    except NotJSONError as exc:
        raise NotJSONError(f"{exc} in {where} is not JSON: use str, int, float, bool, "
                           "None, list or dict") from None
    except (TypeError, ValueError) as exc:  # NaN, infinity, bad keys
        raise NotJSONError(f"{where} are not JSON: {exc}") from None
    except RecursionError:
        raise NotJSONError(f"{where} are nested too deeply to be JSON, or contain "
                           "themselves") from None


def _check_keys(values, where):
    """Refuse a dict key in the user's ``values`` (arguments, a result) that
    is not a str: JSON would make 1, 1.5, True and None strings, and {1: "a",
    "1": "b"} would lose an entry. Call it once ``values`` encoded, so it
    cannot contain itself."""
    todo = [value for value in values if isinstance(value, _CONTAINERS)]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise NotJSONError(f"the dict key {key!r} (type {type(key).__name__}) in "
                                       f"{where} is not JSON: keys must be str")
            item = item.values()
        todo += [inner for inner in item if isinstance(inner, _CONTAINERS)]


_CONTAINERS = (dict, list, tuple)


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


# Running a task ###############################################################
#
# Whatever the mode, a run ends as a reply: {"ok": True, "result": ...} or
# {"ok": False, "error": {...}, "cancelled": bool}. A task's failure becomes
# data here and turns back into its exception in join() (see _rebuild).


def _execute(task, args, kwargs, ctx, limit):
    """Run a plain task function in this thread."""
    token = _CURRENT.set(ctx)
    try:
        return _success(task, task.func(*args, **kwargs), limit)
    except BaseException as exc:  # a task's SystemExit is its failure, not ours
        return _failure(exc)
    finally:
        _CURRENT.reset(token)


async def _execute_async(task, args, kwargs, ctx, limit):
    """Run an async task on the running loop (a task of its own, with its own
    copy of the context, so current_task() is this one)."""
    import asyncio
    _CURRENT.set(ctx)
    try:
        timeout = asyncio.timeout(task.timeout)
        try:
            async with timeout:
                result = await task.func(*args, **kwargs)
        except TimeoutError:
            if not timeout.expired():
                raise  # the task's own TimeoutError, not our deadline
            raise TimeoutError(f"task exceeded its timeout of {task.timeout:g}s; "
                               "its coroutine was cancelled") from None
        return _success(task, result, limit)
    except asyncio.CancelledError:
        raise  # the pool's to handle: castor cancelled it, or the task itself did
    except BaseException as exc:  # a task's SystemExit must not take the loop down
        return _failure(exc)


def _success(task, result, limit):
    if _small_scalar(result, limit):
        return {"ok": True, "result": result}
    where = f"the result of {task.name}"
    size = len(_to_json(result, where))
    _check_keys((result,), where)
    if size > limit:
        raise PayloadTooLarge(f"the result of {task.name} is {size:,} bytes of JSON, over the "
                              f"limit of {limit:,} (Manager(max_payload=...))")
    return {"ok": True, "result": result}


def _small_scalar(value, limit):
    """A result that surely is JSON and under ``limit``, without encoding it."""
    kind = type(value)
    if kind is str:
        return len(value) * 6 + 2 <= limit  # \u escapes are the worst case
    return value is None or kind is bool or kind is int and -10**15 < value < 10**15 or (
        kind is float and math.isfinite(value))


def _failure(exc):
    return {"ok": False, "error": _error_data(exc), "cancelled": isinstance(exc, Cancelled)}


def _run_inline_attempt(task, doc):
    """One attempt in the caller's process (immediate mode)."""
    ctx = TaskContext(doc["id"], task.name, doc["attempts"])
    limit = task.manager.max_payload
    if task.mode != "async":
        reply = _execute(task, doc["args"], doc["kwargs"], ctx, limit)
    else:
        reply = _run_coroutine(lambda: _inline_async(task, doc, ctx, limit))
    if ctx._progress is not None:  # kept in the document, as a worker keeps it
        doc["progress"] = ctx._progress
    return reply


async def _inline_async(task, doc, ctx, limit):
    import asyncio
    try:
        return await _execute_async(task, doc["args"], doc["kwargs"], ctx, limit)
    except asyncio.CancelledError:  # nobody else can cancel it here
        return _failed("the task's coroutine was cancelled by its own code")


def _run_coroutine(make):
    """Run a coroutine to its end from synchronous code. Inside a running
    event loop (a FastAPI handler) it runs on a loop of its own in another
    thread, and the caller waits: blocking its loop, but never deadlocking."""
    import asyncio
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box = []

    def run():
        try:
            box.append((asyncio.run(make()), None))
        except BaseException as exc:  # raised in the caller's thread, as without a loop
            box.append((None, exc))
    helper = threading.Thread(target=run, name="castor-immediate")
    helper.start()
    helper.join()
    result, exc = box[0]
    if exc is not None:
        raise exc
    return result


def _error_data(exc, tb=None):
    """An exception as JSON: enough to rebuild it on the caller's side."""
    cls = type(exc)
    args = list(exc.args)
    if isinstance(exc, OSError) and exc.filename is not None and len(args) == 2:
        # OSError(errno, strerror, filename[, winerror, filename2]): the names
        # are in its message but not in its args.
        args += [exc.filename] + ([None, exc.filename2] if exc.filename2 is not None else [])
    try:
        args = json.loads(_dumps(args))
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


def _verdict(message, kind="TaskError"):
    """Error data for a failure castor itself detects (lost, terminated...)."""
    return {"module": "castor", "qualname": kind, "message": message,
            "args": [message], "traceback": f"castor.{kind}: {message}\n"}


def _failed(message):
    """A reply for a run that castor itself ended."""
    return {"ok": False, "error": _verdict(message)}


def _finish_doc(doc, reply, now):
    """Write a finished run's outcome into its task document."""
    doc["finished_at"] = _iso(now)
    if reply["ok"]:
        doc.update(status="success", result=reply["result"], error=None, exception=None)
    else:
        err = reply["error"]
        doc.update(status="cancelled" if reply.get("cancelled") else "failed", result=None,
                   error=err["traceback"], exception=err)


def _result_of(doc):
    """The result of a finished task document, or its exception raised."""
    if doc["status"] == "success":
        return doc["result"]
    if doc["status"] == "cancelled":
        raise Cancelled(f"task {doc['id']} was cancelled", "castor.Cancelled",
                        (doc.get("exception") or {}).get("traceback"))
    raise _rebuild(doc.get("exception") or _verdict(str(doc.get("error"))))


def _rebuild(err):
    """The task's own exception type when this process knows it, else TaskError.

    Only modules already imported here are searched: the store is data, and a
    document never makes this process import code.
    """
    type_name = f"{err.get('module')}.{err.get('qualname')}"
    note = f"Traceback from the castor worker:\n{err.get('traceback', '')}"
    cls = _find_class(err.get("module"), err.get("qualname"))
    exc = None
    if cls is not None and issubclass(cls, TaskError):  # castor's own verdicts
        exc = cls(err.get("message"), type_name, err.get("traceback"))
    elif cls is not None and issubclass(cls, Exception):
        with contextlib.suppress(Exception):
            exc = cls(*(err.get("args") if err.get("args") is not None else [err.get("message")]))
            if str(exc) != err.get("message"):  # its __init__ made something else of them
                exc = None
    if exc is None:
        exc = TaskError(f"{type_name}: {err.get('message')}", type_name, err.get("traceback"))
    exc.add_note(note)
    return exc


def _find_class(module_name, qualname):
    import builtins
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


# Cron #########################################################################

#: The five fields of a cron expression: name, lowest, highest value, the names
#: the field accepts and how to describe them. Day-of-week 7 is Sunday too.
_CRON_FIELDS = (
    ("minute", 0, 59, {}, ""),
    ("hour", 0, 23, {}, ""),
    ("day-of-month", 1, 31, {}, ""),
    ("month", 1, 12, {name: number for number, name in enumerate(
        "jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)},
     " or a month name (jan-dec)"),
    ("day-of-week", 0, 7, {name: number for number, name in enumerate(
        "sun mon tue wed thu fri sat".split())},
     " or a day name (sun-sat)"),
)

#: The ``@`` shorthands and the expressions they stand for.
_CRON_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

#: The longest day of each month, in a leap year.
_CRON_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

#: How many years ahead ``next_after`` looks. A 29 February that must also be
#: a Sunday (``0 0 29 2 */7``) can be 40 years away; most slots are much closer.
_CRON_HORIZON_YEARS = 41


class _CronSyntax(ValueError):
    """One bad item of a field: ``args`` are the item and what is wrong with it."""


class _Cron:
    """A five-field cron expression in a time zone: ``_Cron("0 9 * * mon-fri",
    tz="Europe/Paris")``.

    Slots are wall-clock minutes in the zone; ``next_after(ts)`` turns them
    into UTC POSIX times. A slot the clock skips (spring forward) fires once,
    at the end of the gap: 02:30 fires at the 03:00 that follows 01:59. A slot
    the clock shows twice (fall back) fires once, at its first occurrence; the
    repeated wall-clock time is never replayed. Day-of-month and day-of-week
    combine as in Vixie cron: when both are restricted (neither starts with
    ``*``) a day matches either one, otherwise it must match both.
    """

    def __init__(self, expression, tz="UTC"):
        if not isinstance(expression, str):
            raise TypeError(f"cron expression must be a str, not {expression!r}")
        self.expression = expression.strip()
        self._zone = _cron_zone(tz)
        self.tz = getattr(self._zone, "key", None) or str(self._zone)
        fields = _cron_fields(self.expression)
        (self.minutes, self.hours, self.days, self.months,
         self.weekdays) = (_cron_field(self.expression, spec, text)
                           for spec, text in zip(_CRON_FIELDS, fields))
        # Vixie cron looks at the first character, not at the values: "*/2"
        # counts as unrestricted even though it leaves days out.
        self._either_day = not (fields[2].startswith("*") or fields[4].startswith("*"))
        if not self._possible():
            raise ValueError(f"bad cron expression {self.expression!r}: it never"
                             " fires (no month in the month field has such a day)")

    def __repr__(self):
        return f"<castor._Cron {self.expression!r} tz={self.tz!r}>"

    def __str__(self):
        return f"{self.expression} ({self.tz})"

    def next_after(self, ts):
        """The first slot strictly after the UTC POSIX time ``ts``, as one."""
        local = datetime.datetime.fromtimestamp(ts, self._zone)
        # During a repeated hour the wall clock reads earlier than slots that
        # already fired; their instants are <= ts, so the check skips them.
        start = local.replace(tzinfo=None, second=0, microsecond=0, fold=0)
        for wall in self._walls_from(start):
            at = self._instant(wall)
            if at > ts:
                return at
        raise ValueError(f"cron expression {self.expression!r} has no slot in the"
                         f" {_CRON_HORIZON_YEARS} years after {ts!r}")

    def _possible(self):
        """Whether some date matches; only the day-of-month can rule out all."""
        if self._either_day:
            return True  # every month has every weekday
        # With "*" in day-of-week every date matches on some year's Sunday.
        return any(day <= _CRON_MONTH_DAYS[month - 1]
                   for month in self.months for day in self.days)

    def _day_matches(self, day):
        """Whether the date ``day`` (its month already matching) has slots."""
        by_date = day.day in self.days
        by_weekday = day.isoweekday() % 7 in self.weekdays
        if self._either_day:
            return by_date or by_weekday
        return by_date and by_weekday

    def _days_from(self, day):
        """The matching dates from ``day`` on, in order, within the horizon."""
        limit = min(day.year + _CRON_HORIZON_YEARS, datetime.MAXYEAR)
        while day.year < limit:
            if day.month not in self.months:
                # Jump to the 1st of next month: a whole month of days at once.
                day = datetime.date(day.year + day.month // 12, day.month % 12 + 1, 1)
                continue
            if self._day_matches(day):
                yield day
            day += datetime.timedelta(days=1)

    def _walls_from(self, start):
        """The slots from the naive wall-clock minute ``start`` on, in order."""
        for day in self._days_from(start.date()):
            first = day == start.date()
            for hour in self.hours:
                if first and hour < start.hour:
                    continue
                same_hour = first and hour == start.hour
                for minute in self.minutes:
                    if not (same_hour and minute < start.minute):
                        yield datetime.datetime(day.year, day.month, day.day, hour, minute)

    def _instant(self, wall):
        """The POSIX time at which the naive wall-clock minute ``wall`` fires."""
        # fold=0 is the first occurrence of a time the clock shows twice.
        at = wall.replace(tzinfo=self._zone).timestamp()
        if self._wall(at) == wall:
            return at
        return self._gap_end(wall)

    def _gap_end(self, wall):
        """The first instant whose wall clock reads ``wall`` or later.

        ``wall`` falls in a gap; its two folds map on either side of the jump,
        and a bisection on whole seconds finds the jump itself.
        """
        times = (wall.replace(tzinfo=self._zone, fold=fold).timestamp()
                 for fold in (0, 1))
        low, high = sorted(times)
        while high - low > 1:
            middle = (low + high) // 2
            if self._wall(middle) >= wall:
                high = middle
            else:
                low = middle
        return float(high)

    def _wall(self, ts):
        """The naive wall-clock time of the POSIX time ``ts`` in the zone."""
        return datetime.datetime.fromtimestamp(ts, self._zone).replace(tzinfo=None)


def _cron_zone(tz):
    """The tzinfo for ``tz``, a zone name or a tzinfo."""
    if isinstance(tz, datetime.tzinfo):
        return tz
    if not isinstance(tz, str):
        raise TypeError(f"tz must be a time zone name or a tzinfo, not {tz!r}")
    if tz == "UTC":
        return datetime.timezone.utc  # needs no tz database (Windows)
    import zoneinfo
    try:
        return zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError: a malformed key such as "../x"; OSError: a directory.
        raise ValueError(f"unknown time zone {tz!r}") from None


def _cron_fields(expression):
    """The five field texts of ``expression``, macros expanded, lower case."""
    text = expression.lower()
    if text.startswith("@"):
        if text not in _CRON_MACROS:
            raise ValueError(
                f"bad cron expression {expression!r}: unknown macro {expression!r}"
                f" (use one of {', '.join(_CRON_MACROS)})")
        text = _CRON_MACROS[text]
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(
            f"bad cron expression {expression!r}: expected 5 fields (minute hour"
            f" day-of-month month day-of-week), got {len(fields)}")
    return fields


def _cron_field(expression, spec, text):
    """The sorted values of one field; ValueError names the field and the item."""
    name, low, high, names, hint = spec
    try:
        values = set()
        for item in text.split(","):
            if not item:
                raise _CronSyntax(text, "has an empty item")
            values.update(_cron_item(item, low, high, names, hint))
    except _CronSyntax as error:
        item, problem = error.args
        where = f"{name} field {text!r}"
        where += "" if item == text else f": {item!r}"
        raise ValueError(f"bad cron expression {expression!r}: {where} {problem}") from None
    if name == "day-of-week":
        values = {value % 7 for value in values}  # 7 is Sunday, like 0
    return tuple(sorted(values))


def _cron_item(item, low, high, names, hint):
    """The values of ``*``, ``n``, ``a-b``, each with an optional ``/step``."""
    body, slash, step = item.partition("/")
    step = _cron_step(item, step) if slash else 1
    if body == "*":
        first, last = low, high
    elif "-" in body:
        first, last = _cron_range(item, body, low, high, names, hint)
    elif body:
        first = _cron_value(body, low, high, names, hint)
        last = high if slash else first  # "5/15" means "5-max/15"
    else:
        raise _CronSyntax(item, "has no value before '/'")
    return range(first, last + 1, step)


def _cron_step(item, text):
    """The step after the ``/`` of ``item``: a positive integer."""
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise _CronSyntax(item, f"has a bad step {text!r}: a step must be a"
                                " positive integer")
    return int(text)


def _cron_range(item, body, low, high, names, hint):
    """The two ends of the range ``a-b``, checked to be in order."""
    ends = body.split("-")
    if len(ends) != 2 or not all(ends):
        raise _CronSyntax(item, "is not a valid range (expected a-b)")
    first = _cron_value(ends[0], low, high, names, hint)
    last = _cron_value(ends[1], low, high, names, hint)
    if ends[1] == "sun" and first > 0:
        last = 7  # "fri-sun" reads as Friday to Sunday, not as a reversed range
    if first > last:
        raise _CronSyntax(item, f"is a reversed range ({first} > {last})")
    return first, last


def _cron_value(text, low, high, names, hint):
    """The number ``text`` stands for: digits or a name, within the field."""
    if text in names:
        return names[text]
    if not (text.isascii() and text.isdigit()):
        raise _CronSyntax(text, f"is not a number{hint}")
    value = int(text)
    if not low <= value <= high:
        raise _CronSyntax(text, f"is out of range {low}-{high}")
    return value


# Storage ######################################################################
#
# Both stores sit behind _Store: the operations castor needs, named by what
# they do, with no SQL dialect showing. SQL lives only in the subclasses; the
# decisions (when a retry is due, how many losses fail a task, what a
# periodic slot means) are the worker's, in plain functions that take the
# time (see "Worker: decisions"), and reach the store as values or as a
# ``verdict`` function that rewrites a document.


class _Store:
    """The storage operations castor uses. Every method raises StoreError
    when the store cannot be used (disk full, server gone)."""

    #: What logs, screens and errors call this store: never a password.
    name = "store"

    #: Tasks a worker claims per thread: one running, the rest waiting behind
    #: it. More when a commit costs more, so a drain needs fewer of them, and
    #: more while tasks are short (_Window).
    claim_ahead = 2

    # Application side ---------------------------------------------------------

    def enqueue(self, new):
        """Add _NewTasks in one transaction; their ids, in order. A unique
        task already pending or running gives that task's id instead."""
        raise NotImplementedError

    def enqueue_batch(self, make, batch):
        """``enqueue`` of ``make(args)`` for each args of a .map() (``make`` is
        a _Batch); a store may make them as it writes them."""
        return self.enqueue([make(args) for args in batch])

    def put_finished(self, doc):
        """Store a task that already ran (immediate mode)."""
        raise NotImplementedError

    def finish_pending(self, doc):
        """Record a pending task that ran in the caller's process (a retry in
        immediate mode) as finished; False if it was no longer pending."""
        raise NotImplementedError

    def check_storable(self, raw, where):
        """Refuse a new task's document this store cannot hold (immediate mode
        asks before it runs the task, as enqueue would)."""

    def get(self, task_id):
        """A task document, or None."""
        raise NotImplementedError

    def list(self, status, name, limit, offset):
        """Documents newest first, optionally of one status and task name."""
        raise NotImplementedError

    def counts(self):
        """Tasks by status, from counters and small indexes: no scan."""
        raise NotImplementedError

    def prune(self, before):
        """Delete tasks finished before ``before``; how many."""
        raise NotImplementedError

    def cancel(self, task_id, now):
        """Cancel a pending task, or ask a running one to stop; False if finished."""
        raise NotImplementedError

    def requeue(self, ids, status, name, now):
        """Failed or cancelled tasks back to pending (by id, or all of
        ``status`` and ``name``), their history kept; the ids of those."""
        raise NotImplementedError

    def version(self):
        """A value that changes when someone else commits; None if unknown
        (then a waiting join reads the document each time it looks)."""
        raise NotImplementedError

    def news(self):
        """For a worker's claims: a value that changes when there may be new
        work (someone else committed, or a notification came); None if unknown."""
        return self.version()

    # Worker side --------------------------------------------------------------

    def exchange(self, worker_id, outcomes, progress, wants, limits, now):
        """One transaction: record ``outcomes`` (_Outcome, fenced by lease)
        and ``progress`` {id: report}, then claim due tasks: ``wants`` is
        {mode: (n, idle)}, up to n tasks of which at most ``idle`` (slots free
        to start them now) of a name in ``limits`` {name: n}, the most that
        may run at once anywhere. Returns an _Exchange."""
        raise NotImplementedError

    def cancel_requests(self, worker_id):
        """Ids of this worker's running tasks that someone asked to stop."""
        raise NotImplementedError

    def register(self, worker_id, info, now):
        raise NotImplementedError

    def heartbeat(self, worker_id, now):
        """Renew the worker's lease; False if others had taken it for dead."""
        raise NotImplementedError

    def deregister(self, worker_id):
        raise NotImplementedError

    def workers(self):
        """Live workers as dicts: id, pid, host, started_at, heartbeat_at,
        ``beat`` (the raw heartbeat) and ``age`` (seconds, by the store's clock)."""
        raise NotImplementedError

    def reap(self, dead, now, verdict):
        """Drop ``dead`` workers {id: beat} whose beat is unchanged, and pass
        their running tasks (and those of no live worker) through
        ``verdict(doc, losses, cancelled, now)``; the documents written."""
        raise NotImplementedError

    def release(self, worker_id, now, verdict, keep=()):
        """This worker's running tasks, but those in ``keep``, through
        ``verdict``, no loss counted (it is stopping, or a claim it could not
        confirm went through after all)."""
        raise NotImplementedError

    def periodic(self):
        """{task name: next run} of the periodic tasks."""
        raise NotImplementedError

    def fire_periodic(self, name, expected, next_run, new):
        """If the next run of ``name`` is still ``expected``, make it
        ``next_run`` and enqueue ``new`` (if any), atomically: True if this
        caller won. Of several workers, exactly one wins each slot."""
        raise NotImplementedError

    def watch(self):
        """Something to select() on that wakes when others commit, or None."""
        raise NotImplementedError

    def check(self):
        """Raise StoreError if the store went away under us."""

    def close(self):
        """Let go of connections and watches."""


class _Outcome:
    """How a run ended, ready for the store: a final document, or one going
    back to pending (its status says so) until ``retry_at``. ``lease``
    fences late results."""

    __slots__ = ("doc", "raw", "retry_at", "lease", "note")

    def __init__(self, doc, raw, retry_at, lease, note=None):
        self.doc, self.raw, self.retry_at, self.lease = doc, raw, retry_at, lease
        self.note = note  # the log line, written once the store holds the outcome


class _Exchange:
    """What an exchange did: outcomes recorded or refused (their lease was
    lost), tasks claimed {mode: [(doc, lease, cancel)]} (cancel: someone asked
    to cancel it while an earlier attempt ran), and for each mode that came
    back short, when its next scheduled task is due (None: none is)."""

    __slots__ = ("recorded", "refused", "claimed", "idle")

    def __init__(self):
        self.recorded, self.refused, self.claimed, self.idle = [], [], {}, {}


class _Room:
    """What a claim may still take of the names with a concurrency limit:
    ``left`` per name (its limit less the ``running`` [(name, n)]), and
    ``idle`` in all (slots free to start them now: a limited task must not
    wait behind another in a worker's queue)."""

    def __init__(self, limits, idle, running):
        self.left, self.idle = dict(limits), idle
        for name, n in running:
            self.left[name] -= n

    def pick(self, n, due):
        """Up to ``n`` seqs of due tasks, in queue order, that fit; ``due(full,
        picked, k)`` gives the next k due rows (seq, name) not of a ``full``
        name and not already ``picked``."""
        picked = []
        while len(picked) < n:
            rows = due(self.full(), picked, n - len(picked))
            if not rows:
                break
            picked += self.take(rows)
        return picked

    def full(self):
        """The names that may not be taken any more."""
        return [name for name, left in self.left.items() if left <= 0 or self.idle <= 0]

    def take(self, rows):
        """Of due rows (seq, name) in queue order, the seqs that fit."""
        picked = []
        for seq, name in rows:
            if name in self.left:
                if self.left[name] <= 0 or self.idle <= 0:
                    continue
                self.left[name] -= 1
                self.idle -= 1
            picked.append(seq)
        return picked


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


#: One decoder for all, refusing NaN and Infinity (json.loads with options
#: builds a new decoder each call).
_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def _load_doc(task_id, raw):
    """A document as stored; garbage becomes a document that says so."""
    try:
        # NaN and Infinity (which beaver's json.dumps lets through) are garbage
        # too: SQLite's and PostgreSQL's JSON refuse them.
        doc = _DECODER.decode(raw) if isinstance(raw, str) else raw
    except (TypeError, ValueError):
        doc = None
    if not isinstance(doc, dict) or doc.get("status") not in STATUSES:
        return _corrupt_doc(task_id, raw)
    return doc


def _corrupt_doc(task_id, raw=None):
    """A stand-in for a document that is missing or garbage, still ours to fail."""
    return {"id": task_id, "task_name": None, "status": "pending", "args": None, "kwargs": None,
            "corrupt": "the document is missing" if raw is None else str(raw)[:1000]}


def _as_int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _host_id():
    """This machine (its boot, as cloned machines share a hostname) and its pid
    namespace: a pid means something only there."""
    import socket
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    boot = _read_text("/proc/sys/kernel/random/boot_id").strip()[:8] or "-"
    return f"{socket.gethostname()}/{boot}/{namespace}"


# Storage: the beaver file #####################################################
#
# The task documents live in beaver's own dict table, ``__beaver_dicts__``,
# under dict_name ``castor_tasks``: ``db.dict("castor_tasks")[task_id]`` reads
# them through beaver's public API. Castor writes them with its own SQL,
# because beaver's per-call API costs about 2 ms (an inter-process lock made of
# three transactions) and its blocking reads poll every 100 ms.
#
# Next to the documents castor keeps its own tables in the same file:
#   castor_jobs     one row per task (``seq`` is the queue order): status,
#                   mode, priority, eta, owner and lease, unique key, cancel
#                   request. Partial indexes cover pending and running rows
#                   apart from finished ones, so enqueue and claim cost the
#                   same with 100k finished tasks as with none.
#   castor_workers  one row per live worker, with a heartbeat.
#   castor_stats    counts of finished tasks by status, kept in step.
#   castor_periodic when each periodic task is next due.
#
# Every state change updates castor_jobs and the document in one
# ``BEGIN IMMEDIATE`` transaction: a claim marks the jobs running, names the
# worker, bumps the lease and rewrites the documents (two statements for a
# batch), so no task goes to two workers. A worker claims only as many tasks
# as it has free slots, and records finished tasks in the same transaction as
# its next claim (group commit).
#
# Waiting: ``join`` polls ``PRAGMA data_version``, which changes only when
# another connection commits; an idle worker sleeps on an inotify watch of the
# file's directory (see "Worker: waking up").
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

#: Columns added since castor 0.1, for files made by it: (table, column, type).
_SCHEMA_ADDED = (
    ("castor_jobs", "lease", "INTEGER NOT NULL DEFAULT 0"),
    ("castor_jobs", "unique_key", "TEXT"),
    ("castor_jobs", "cancel", "INTEGER NOT NULL DEFAULT 0"),
    ("castor_workers", "info", "TEXT"),
)

_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS castor_jobs_id ON castor_jobs (id);
CREATE INDEX IF NOT EXISTS castor_jobs_ready
    ON castor_jobs (mode, priority, seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS castor_jobs_eta
    ON castor_jobs (mode, eta) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS castor_jobs_running
    ON castor_jobs (worker) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS castor_jobs_done
    ON castor_jobs (status, seq) WHERE finished IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS castor_jobs_unique ON castor_jobs (unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('pending', 'running');
"""

_WHERE_DOC = f"WHERE dict_name = '{DICT_NAME}' AND key"
_ADD_DOC = ("INSERT INTO __beaver_dicts__ (dict_name, key, value, expires_at) "
            f"VALUES ('{DICT_NAME}', ?, ?, NULL)")
_RESTORE_DOC = ("INSERT OR IGNORE INTO __beaver_dicts__ (dict_name, key, value, expires_at) "
                f"VALUES ('{DICT_NAME}', ?, ?, NULL)")
_SET_DOC = f"UPDATE __beaver_dicts__ SET value = ? {_WHERE_DOC} = ?"
_GET_DOC = f"SELECT value FROM __beaver_dicts__ {_WHERE_DOC} = ?"
_DEL_DOC = f"DELETE FROM __beaver_dicts__ {_WHERE_DOC} = ?"
_ADD_JOB = ("INSERT INTO castor_jobs (id, name, mode, status, priority, eta, unique_key) "
            "VALUES (?, ?, ?, 'pending', ?, ?, ?)")
_BUMP = ("INSERT INTO castor_stats (status, n) VALUES (?, ?) "
         "ON CONFLICT (status) DO UPDATE SET n = n + excluded.n")
_LIST_DOCS = ("SELECT j.id, d.value FROM castor_jobs j LEFT JOIN __beaver_dicts__ d "
              f"ON d.dict_name = '{DICT_NAME}' AND d.key = j.id {{where}} "
              "ORDER BY j.seq DESC LIMIT ? OFFSET ?")
_PENDING_LOOK = "status = 'pending' AND mode = ? AND eta <= ?"
_RECORD_JOB = ("UPDATE castor_jobs SET status = ?, finished = ?, eta = ? WHERE id = ? AND "
               "worker = ? AND lease = ? AND status = 'running'")

# SQLite has no statistics on these tables (castor never runs ANALYZE on the
# user's file), and without them its planner takes the eta index for a claim
# and sorts the whole backlog: the claim would cost O(pending). The INDEXED BY
# hints below name the partial index each query must walk.

#: A claim rewrites its documents inside SQLite: one statement for the batch.
#: A document that is not a JSON object is left alone, to be failed as corrupt.
_CLAIM_DOCS = (
    "UPDATE __beaver_dicts__ SET value = CASE WHEN json_valid(value) THEN "
    "CASE WHEN json_type(value) = 'object' THEN json_set(value, '$.status', 'running', "
    "'$.started_at', ?, '$.worker', ?, '$.attempts', "
    "coalesce(json_extract(value, '$.attempts'), 0) + 1) ELSE value END ELSE value END "
    f"{_WHERE_DOC} IN ({{marks}}) RETURNING key, value")

#: Progress goes into the document of a task that is still running.
_SET_PROGRESS = ("UPDATE __beaver_dicts__ SET value = json_set(value, '$.progress', json(?)) "
                 f"{_WHERE_DOC} = ? AND json_valid(value) "
                 "AND json_extract(value, '$.status') = 'running'")


def _sqlite_errors(method):
    """sqlite3 errors leave the store as StoreError, with the file named."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise StoreError(self.explain(exc)) from exc
    return wrapper


class _SqliteFile(_Store):
    """The beaver file: castor's connections to it (one per thread), its
    schema, write transactions, and the documents in beaver's table."""

    def __init__(self, path):
        self.path = self.name = path
        self._local = threading.local()
        self._schema_ready = False
        self._identity = _file_identity(path)
        self._checkpointer = _Checkpointer(path)
        kind = _network_fs(path, _read_text("/proc/self/mounts"))
        if kind is not None:
            logger.warning("%s is on a network file system (%s): SQLite's locking is not safe "
                           "there, and workers on other machines would corrupt it. Keep the "
                           "file on a local disk, or use the PostgreSQL store", path, kind)

    @property
    def conn(self):
        """This thread's connection for reads, which wait out a busy file."""
        conn = self._connection()
        if not self._local.waits:
            conn.execute(_WAIT_WHEN_BUSY)
            self._local.waits = True
        return conn

    def _connection(self):
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # not across fork()
            local.conn, local.pid, local.waits = self._connect(), os.getpid(), True
        return local.conn

    def explain(self, exc):
        text = str(exc)
        if "disk is full" in text or "disk I/O" in text:
            return f"cannot write {self.path}: the disk is full ({text})"
        if "locked" in text:
            return f"{self.path} stayed locked by another process for {BUSY_TIMEOUT:g}s ({text})"
        return f"{self.path}: {text}"

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                               check_same_thread=False)
        # Same durability as beaver's own connection on this file: WAL and
        # synchronous=NORMAL survive a killed process, with no fsync a commit.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA mmap_size = 268435456")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpoint thread's job
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        if not self._schema_ready:
            self._create_schema(conn)
        return conn

    def _create_schema(self, conn):
        ready = "SELECT 1 FROM sqlite_master WHERE name = 'castor_jobs_unique'"
        if not conn.execute(ready).fetchone():
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                with self._transaction(conn):
                    _run_script(conn, _SCHEMA)
                    for table, column, kind in _SCHEMA_ADDED:
                        if column not in _columns(conn, table):
                            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                    _run_script(conn, _INDEXES)
            finally:
                conn.execute(_WAIT_WHEN_BUSY)
        self._schema_ready = True

    def _write(self):
        """A write transaction on this thread's connection.

        _begin_immediate waits for the lock itself, so SQLite's busy wait is
        turned off for writes, and back on only by the next read: a producer
        that only enqueues never pays for turning it on and off.
        """
        conn = self._connection()
        if self._local.waits:
            conn.execute("PRAGMA busy_timeout = 0")
            self._local.waits = False
        return self._transaction(conn)

    @contextlib.contextmanager
    def _transaction(self, conn):
        """A write transaction that takes the lock up front (no deadlocks)."""
        _begin_immediate(conn)
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # also after a failed COMMIT (disk full...)
                conn.execute("ROLLBACK")
            raise
        self._checkpointer.poke()

    @_sqlite_errors
    def version(self):
        # data_version moves on others' commits only; this thread's connection
        # (a cancel from the coroutine next to a waiting resolve) counts its own.
        conn = self.conn
        return conn.execute("PRAGMA data_version").fetchone()[0], conn.total_changes

    @_sqlite_errors
    def news(self):
        return self.conn.execute("PRAGMA data_version").fetchone()[0]  # our own: see touch()

    def watch(self):
        return _InotifyWatch.open(os.path.dirname(self.path))

    def check(self):
        identity = _file_identity(self.path)
        if identity != self._identity:
            what = "was deleted" if identity is None else "was replaced by another file"
            raise _StoreGone(f"the database file {self.path} {what} while this worker "
                             "was using it")

    def close(self):
        self._checkpointer.stop()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.pid = None

    # Documents ----------------------------------------------------------------

    def _doc_in(self, conn, task_id):
        row = conn.execute(_GET_DOC, (task_id,)).fetchone()
        return _corrupt_doc(task_id) if row is None else _load_doc(task_id, row[0])

    def _put_doc(self, conn, doc):
        raw = _dumps(doc)
        if not conn.execute(_SET_DOC, (raw, doc["id"])).rowcount:
            conn.execute(_RESTORE_DOC, (doc["id"], raw))

    def _bump(self, conn, counter, sign=1):
        conn.executemany(_BUMP, [(status, sign * n) for status, n in counter.items() if n])


class _SqliteTasks(_SqliteFile):
    """The beaver file, the application's side: add, read, cancel, re-drive."""

    @_sqlite_errors
    def enqueue(self, new):
        with self._write() as conn:
            if any(item.unique_key for item in new):
                return [self._add_unique(conn, item) for item in new]
            self._add(conn, new)
        return [item.doc["id"] for item in new]

    def _add(self, conn, new):
        # Documents in key order: a batch then fills beaver's index page by page
        # instead of at random places (the jobs keep queue order: seq is theirs).
        conn.executemany(_ADD_DOC, sorted((item.doc["id"], item.raw) for item in new))
        conn.executemany(_ADD_JOB, [
            (item.doc["id"], item.doc["task_name"], item.doc["mode"], item.doc["priority"],
             item.eta, item.unique_key) for item in new])

    def _add_unique(self, conn, item):
        if item.unique_key is not None:
            row = conn.execute("SELECT id FROM castor_jobs WHERE unique_key = ? AND status "
                               "IN ('pending', 'running')", (item.unique_key,)).fetchone()
            if row is not None:
                return row[0]
        self._add(conn, [item])
        return item.doc["id"]

    @_sqlite_errors
    def put_finished(self, doc):
        with self._write() as conn:
            conn.execute(_ADD_DOC, (doc["id"], _dumps(doc)))
            conn.execute(
                "INSERT INTO castor_jobs (id, name, mode, status, finished) VALUES (?, ?, ?, ?, ?)",
                (doc["id"], doc["task_name"], doc["mode"], doc["status"], time.time()))
            conn.execute(_BUMP, (doc["status"], 1))

    @_sqlite_errors
    def finish_pending(self, doc):
        with self._write() as conn:
            if not conn.execute("UPDATE castor_jobs SET status = ?, finished = ? WHERE id = ? "
                                "AND status = 'pending'",
                                (doc["status"], time.time(), doc["id"])).rowcount:
                return False
            conn.execute(_SET_DOC, (_dumps(doc), doc["id"]))
            conn.execute(_BUMP, (doc["status"], 1))
        return True

    @_sqlite_errors
    def get(self, task_id):
        if _no_task_has(task_id):
            return None
        row = self.conn.execute(_GET_DOC, (task_id,)).fetchone()
        return None if row is None else _load_doc(task_id, row[0])

    @_sqlite_errors
    def list(self, status, name, limit, offset):
        if name is not None and _no_task_has(name):
            return []
        terms, params = [], []
        if status is not None:
            terms.append(f"j.status = '{status}'")  # a literal: checked against STATUSES
            if status in FINISHED:  # lets SQLite use the index of finished rows
                terms.append("j.finished IS NOT NULL")
        if name is not None:
            terms.append("j.name = ?")
            params.append(name)
        where = "WHERE " + " AND ".join(terms) if terms else ""
        rows = self.conn.execute(_LIST_DOCS.format(where=where), (*params, limit, offset))
        return [_load_doc(task_id, raw) for task_id, raw in rows.fetchall() if raw is not None]

    @_sqlite_errors
    def counts(self):
        counts = dict.fromkeys(STATUSES, 0)
        conn = self.conn
        own = not conn.in_transaction
        if own:
            conn.execute("BEGIN")  # one snapshot: the counts add up even during a drain
        try:
            # Both walk a partial index that holds only unfinished tasks.
            for status, index in (("pending", "castor_jobs_eta"),
                                  ("running", "castor_jobs_running")):
                counts[status] = conn.execute(
                    f"SELECT count(*) FROM castor_jobs INDEXED BY {index} "
                    f"WHERE status = '{status}'").fetchone()[0]
            for status, n in conn.execute("SELECT status, n FROM castor_stats"):
                counts[status] = n
        finally:
            if own:
                conn.execute("COMMIT")
        return counts

    @_sqlite_errors
    def prune(self, before):
        with self._write() as conn:
            rows = conn.execute(
                "SELECT seq, id, status FROM castor_jobs WHERE finished IS NOT NULL "
                "AND finished < ?", (before,)).fetchall()
            conn.executemany("DELETE FROM castor_jobs WHERE seq = ?", [(r[0],) for r in rows])
            conn.executemany(_DEL_DOC, [(r[1],) for r in rows])
            self._bump(conn, collections.Counter(r[2] for r in rows), -1)
        return len(rows)

    @_sqlite_errors
    def cancel(self, task_id, now):
        if _no_task_has(task_id):
            return False
        with self._write() as conn:
            row = conn.execute("SELECT status FROM castor_jobs WHERE id = ?", (task_id,)).fetchone()
            if row is None or row[0] in FINISHED:
                return False
            if row[0] == "running":
                conn.execute("UPDATE castor_jobs SET cancel = 1 WHERE id = ?", (task_id,))
                return True
            conn.execute("UPDATE castor_jobs SET status = 'cancelled', finished = ? "
                         "WHERE id = ?", (now, task_id))
            doc = self._doc_in(conn, task_id)
            doc.update(status="cancelled", finished_at=_iso(now))
            self._put_doc(conn, doc)
            self._bump(conn, {"cancelled": 1})
        return True

    @_sqlite_errors
    def requeue(self, ids, status, name, now):
        ids, findable = _findable(ids, name)
        if not findable:
            return []
        with self._write() as conn:
            if ids is not None:
                marks = ",".join("?" * len(ids))
                rows = conn.execute(f"SELECT id, status FROM castor_jobs WHERE id IN ({marks}) "
                                    "AND status IN ('failed', 'cancelled')", ids).fetchall()
            else:
                rows = conn.execute(
                    "SELECT id, status FROM castor_jobs WHERE status = ? AND finished IS NOT "
                    "NULL AND (? IS NULL OR name = ?)", (status, name, name)).fetchall()
            done, ids = collections.Counter(), []
            for task_id, was in rows:
                # OR IGNORE: a unique task already pending again stays single.
                if conn.execute("UPDATE OR IGNORE castor_jobs SET status = 'pending', "
                                "finished = NULL, eta = ?, cancel = 0, losses = 0 "
                                "WHERE id = ?", (now, task_id)).rowcount:
                    self._put_doc(conn, _redriven(self._doc_in(conn, task_id), now))
                    done[was] += 1
                    ids.append(task_id)
            self._bump(conn, done, -1)
        return ids


class _SqliteStore(_SqliteTasks):
    """Castor's SQL on the beaver file: the worker's side (claim, record,
    heartbeats, reaping, periodic slots) on top of the application's."""

    @_sqlite_errors
    def exchange(self, worker_id, outcomes, progress, wants, limits, now):
        done = _Exchange()
        if not outcomes and not progress:
            # A read first: no write lock taken when there is nothing to do.
            wants = self._ready(wants, now, done)
            if not wants:
                return done
        with self._write() as conn:
            self._record(conn, worker_id, outcomes, now, done)
            conn.executemany(_SET_PROGRESS, [(_dumps(report), task_id)
                                             for task_id, report in progress.items()])
            for mode, (n, idle) in wants.items():
                done.claimed[mode] = claimed = self._claim(conn, worker_id, mode, n, idle,
                                                           limits, now)
                if len(claimed) < n:
                    done.idle[mode] = self._next_eta(conn, mode)
        return done

    def _ready(self, wants, now, done):
        ready = {}
        for mode, n in wants.items():
            if self.conn.execute(f"SELECT 1 FROM castor_jobs INDEXED BY castor_jobs_eta "
                                 f"WHERE {_PENDING_LOOK} LIMIT 1",
                                 (mode, now)).fetchone():
                ready[mode] = n
            else:
                done.idle[mode] = self._next_eta(self.conn, mode)
        return ready

    def _next_eta(self, conn, mode):
        return conn.execute("SELECT min(eta) FROM castor_jobs INDEXED BY castor_jobs_eta "
                            "WHERE status = 'pending' AND mode = ?", (mode,)).fetchone()[0]

    def _record(self, conn, worker_id, outcomes, now, done):
        """Write outcomes whose lease this worker still holds; refuse the rest."""
        params = [_job_outcome(outcome, worker_id, now) for outcome in outcomes]
        if conn.executemany(_RECORD_JOB, params).rowcount == len(outcomes):
            done.recorded += outcomes  # the usual case: one statement for the batch
        else:  # some lease was lost: which rows did we write?
            for outcome, (status, finished, _, task_id, _, lease) in zip(outcomes, params):
                mine = conn.execute("SELECT 1 FROM castor_jobs WHERE id = ? AND worker = ? AND "
                                    "lease = ? AND status = ? AND finished IS ?",
                                    (task_id, worker_id, lease, status, finished)).fetchone()
                (done.recorded if mine else done.refused).append(outcome)
        rows = [(outcome.raw, outcome.doc["id"]) for outcome in done.recorded]
        if conn.executemany(_SET_DOC, rows).rowcount < len(rows):
            # Someone deleted a document meanwhile: the outcome brings it back.
            conn.executemany(_RESTORE_DOC, [(key, raw) for raw, key in rows])
        self._bump(conn, collections.Counter(
            o.doc["status"] for o in done.recorded if o.retry_at is None))

    def _claim(self, conn, worker_id, mode, n, idle, limits, now):
        """Mark up to ``n`` due tasks running for this worker: [(doc, lease, cancel)]."""
        if limits:
            seqs = self._pick_limited(conn, mode, n, idle, limits, now)
            where, params = f"seq IN ({','.join('?' * len(seqs))})", seqs
        else:
            where = (f"seq IN (SELECT seq FROM castor_jobs INDEXED BY castor_jobs_ready WHERE "
                     f"{_PENDING_LOOK} "
                     "ORDER BY priority, seq LIMIT ?)")
            params = (mode, now, n)
        jobs = conn.execute(
            "UPDATE castor_jobs SET status = 'running', worker = ?, lease = lease + 1 "
            f"WHERE {where} RETURNING priority, seq, id, lease, cancel",
            (worker_id, *params)).fetchall()
        if not jobs:
            return []
        ids = [task_id for _, _, task_id, _, _ in jobs]
        docs = dict(conn.execute(_CLAIM_DOCS.format(marks=",".join("?" * len(ids))),
                                 (_iso(now), worker_id, *ids)).fetchall())
        # RETURNING has no order of its own: queue order again.
        return [(_claimed_doc(task_id, docs.get(task_id), worker_id, now), lease, bool(cancel))
                for _, _, task_id, lease, cancel in sorted(jobs)]

    def _pick_limited(self, conn, mode, n, idle, limits, now):
        """Due tasks in queue order, no name past its concurrency limit, and
        limited ones only for slots that can start them now."""
        room = _Room(limits, idle, conn.execute(
            f"SELECT name, count(*) FROM castor_jobs WHERE status = 'running' AND name IN "
            f"({','.join('?' * len(limits))}) GROUP BY name", list(limits)).fetchall())

        def due(full, picked, k):
            return conn.execute(
                f"SELECT seq, name FROM castor_jobs INDEXED BY castor_jobs_ready WHERE "
                f"{_PENDING_LOOK} AND name NOT IN ({','.join('?' * len(full))}) AND seq NOT IN "
                f"({','.join('?' * len(picked))}) ORDER BY priority, seq LIMIT ?",
                (mode, now, *full, *picked, k)).fetchall()
        return room.pick(n, due)

    @_sqlite_errors
    def cancel_requests(self, worker_id):
        return {task_id for (task_id,) in self.conn.execute(
            "SELECT id FROM castor_jobs WHERE status = 'running' AND worker = ? AND cancel = 1",
            (worker_id,))}

    @_sqlite_errors
    def register(self, worker_id, info, now):
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO castor_workers (id, pid, host, started, "
                         "heartbeat, info) VALUES (?, ?, ?, ?, ?, ?)",
                         (worker_id, os.getpid(), _host_id(), now, now, _dumps(info)))

    @_sqlite_errors
    def heartbeat(self, worker_id, now):
        with self._write() as conn:
            return conn.execute("UPDATE castor_workers SET heartbeat = ? WHERE id = ?",
                                (now, worker_id)).rowcount == 1

    @_sqlite_errors
    def deregister(self, worker_id):
        with self._write() as conn:
            conn.execute("DELETE FROM castor_workers WHERE id = ?", (worker_id,))

    @_sqlite_errors
    def workers(self):
        now = time.time()
        rows = self.conn.execute(
            "SELECT id, pid, host, started, heartbeat, info FROM castor_workers ORDER BY started")
        return [_worker_row(*row, age=now - row[4]) for row in rows.fetchall()]

    @_sqlite_errors
    def reap(self, dead, now, verdict):
        if not dead and not self._orphans():
            return []
        with self._write() as conn:
            for wid, beat in dead.items():
                conn.execute("DELETE FROM castor_workers WHERE id = ? AND heartbeat = ?",
                             (wid, beat))
            rows = conn.execute(
                "SELECT id, losses, cancel FROM castor_jobs WHERE status = 'running' AND "
                "(worker IS NULL OR worker NOT IN (SELECT id FROM castor_workers))").fetchall()
            return [self._give_back(conn, row, 1, now, verdict) for row in rows]

    def _orphans(self):
        return self.conn.execute(
            "SELECT 1 FROM castor_jobs INDEXED BY castor_jobs_running WHERE status = 'running' "
            "AND (worker IS NULL OR worker NOT IN (SELECT id FROM castor_workers)) LIMIT 1"
        ).fetchone() is not None

    @_sqlite_errors
    def release(self, worker_id, now, verdict, keep=()):
        with self._write() as conn:
            rows = conn.execute("SELECT id, losses, cancel FROM castor_jobs WHERE "
                                "status = 'running' AND worker = ?", (worker_id,)).fetchall()
            return [self._give_back(conn, row, 0, now, verdict) for row in rows
                    if row[0] not in keep]

    def _give_back(self, conn, row, loss, now, verdict):
        task_id, losses, cancel = row
        doc = verdict(self._doc_in(conn, task_id), losses + loss, bool(cancel), now)
        finished = now if doc["status"] in FINISHED else None
        conn.execute("UPDATE castor_jobs SET status = ?, worker = NULL, losses = ?, "
                     "finished = ? WHERE id = ?", (doc["status"], losses + loss, finished, task_id))
        self._put_doc(conn, doc)
        if finished:
            self._bump(conn, {doc["status"]: 1})
        return doc

    @_sqlite_errors
    def periodic(self):
        return dict(self.conn.execute("SELECT name, next_run FROM castor_periodic"))

    @_sqlite_errors
    def fire_periodic(self, name, expected, next_run, new):
        with self._write() as conn:
            if expected is None:
                won = conn.execute("INSERT OR IGNORE INTO castor_periodic VALUES (?, ?)",
                                   (name, next_run)).rowcount
            else:
                won = conn.execute("UPDATE castor_periodic SET next_run = ? WHERE name = ? "
                                   "AND next_run = ?", (next_run, name, expected)).rowcount
            if won and new is not None:  # a unique one still running: this slot is skipped
                self._add_unique(conn, new)
        return bool(won)


#: Held around each SQLite call of a checkpoint thread, and by fork(): a child
#: must not inherit SQLite's record of a lock that only a thread of its parent
#: held (its checkpoints would then find the file busy for good).
_FORK_GUARD = threading.Lock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_FORK_GUARD.acquire, after_in_parent=_FORK_GUARD.release,
                        after_in_child=_FORK_GUARD.release)


class _Checkpointer:
    """Each process that writes copies the WAL back into the database file in
    a thread of its own, a moment after its writes, so that none of its
    commits has to. Left to SQLite, the checkpoint runs inside whichever
    commit takes the WAL past 1,000 pages, fsyncs included: a .delay() that
    stalls now and then, and a .map() of 5,000 paying for one every time. A
    checkpoint (PASSIVE: it waits for nobody) takes the checkpoint lock, not
    the write lock, so writes go on while it runs; when another process's is
    running, this one's gives way, and the next write tries again. Only to
    let the WAL start over does it hold the write lock, briefly (see
    _checkpoint)."""

    def __init__(self, path):
        self.path, self._pid = path, None
        self._wanted = self._stopped = None  # the running thread's, made by _start

    def poke(self):
        """Something was written: checkpoint soon. Never raises: the write is done."""
        if self._pid != os.getpid():  # the first write (since close), or a fork's child
            with _FORK_GUARD:
                if self._pid != os.getpid():
                    self._start()
        if not self._wanted.is_set():
            self._wanted.set()

    def stop(self):
        """End the thread, after one last checkpoint (which may run after this returns)."""
        if self._pid == os.getpid():
            self._pid = None
            self._stopped.set()
            self._wanted.set()

    def _start(self):
        self._pid, self._stopped = os.getpid(), threading.Event()
        self._wanted = threading.Event()  # a fork's copy may be set: no thread waits on it
        try:
            threading.Thread(target=self._run, args=(self._wanted, self._stopped),
                             name="castor-checkpoint", daemon=True).start()
        except RuntimeError:  # at interpreter shutdown: the next process's writes checkpoint
            self._pid = None
            logger.debug("no checkpoint thread for %s", self.path, exc_info=True)

    def _run(self, wanted, stopped):
        conn = writer = None
        try:
            # A passive checkpoint never waits for another's, but may for a
            # moment's lock (a connection closing); the writer waits its own way.
            conn = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
            writer = sqlite3.connect(self.path, timeout=0, isolation_level=None)
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            while not stopped.is_set():
                wanted.wait()
                stopped.wait(CHECKPOINT_DELAY)  # let more writes gather into one checkpoint
                wanted.clear()
                try:
                    _checkpoint(conn, writer)
                except sqlite3.Error:  # the next write pokes again
                    logger.debug("checkpoint of %s failed", self.path, exc_info=True)
        except Exception:
            logger.warning("the checkpoint thread of %s failed", self.path, exc_info=True)
        finally:
            for each in (conn, writer):
                if each is not None:
                    each.close()
            if self._stopped is stopped:  # it failed: the next write starts another
                self._pid = None


_PASSIVE = "PRAGMA wal_checkpoint(PASSIVE)"


def _checkpoint(conn, writer):
    """Copy the WAL back into the file, waiting for nobody (PASSIVE). A
    passive checkpoint copies only what the WAL held when it began, and the
    WAL starts over only once all of it is copied: writes that never pause
    would make it grow without end (450 MB for 16,000 tasks from four
    producers, measured). So, past WAL_RESTART_PAGES, more passes copy what
    came in during the last, until little does; then, if ``writer`` gets the
    write lock within RESTART_PATIENCE, ``conn`` copies the rest while it
    holds it (a few hundred pages and two fsyncs, 5-16 ms measured), and the
    next write starts the WAL over. Otherwise (a long transaction, say) it
    tries again after the next write."""
    busy, pages = _passive_checkpoint(conn)
    if busy or pages <= WAL_RESTART_PAGES:  # busy: another process's checkpoint is running
        return
    for _ in range(8):  # catch up on what came in meanwhile: then the writers wait little
        busy, more = _passive_checkpoint(conn)
        if busy:
            return
        more, pages = more - pages, more
        if more < CATCH_UP_PAGES:
            break
    else:
        return
    with _FORK_GUARD:
        try:
            _begin_immediate(writer, patience=RESTART_PATIENCE)
        except sqlite3.OperationalError as exc:  # busy: writers are not kept waiting for us
            if getattr(exc, "sqlite_errorcode", None) == _SQLITE_BUSY:
                return
            raise
        try:
            conn.execute(_PASSIVE)
        finally:
            writer.execute("ROLLBACK")


def _passive_checkpoint(conn):
    """(busy, pages in the WAL) after a passive checkpoint, fork() held off."""
    with _FORK_GUARD:
        busy, pages, _ = conn.execute(_PASSIVE).fetchone()
    return busy, pages


def _begin_immediate(conn, patience=BUSY_TIMEOUT):
    """BEGIN IMMEDIATE, waiting for another process's write lock in short,
    jittered steps for up to ``patience`` seconds, on a connection whose own
    busy wait is off.

    SQLite's own busy handler sleeps in growing steps, up to 100 ms, so one
    producer among several could stall for a tenth of a second while the
    others commit in a fraction of a millisecond; this looks every few tenths
    of a millisecond instead. Inside the transaction nothing waits: the lock
    is held, and castor's commits never checkpoint (see _Checkpointer).
    """
    deadline, pause = None, 0.0001
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) != _SQLITE_BUSY:
                raise
            deadline = deadline or time.monotonic() + patience
            if time.monotonic() > deadline:
                raise
        time.sleep(pause * random.uniform(0.5, 1.5))
        pause = min(pause * 1.5, 0.0005)


#: How a connection waits out another process's lock when it reads.
_WAIT_WHEN_BUSY = f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}"


#: SQLite's result code for "the database is locked".
_SQLITE_BUSY = 5


def _run_script(conn, script):
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _columns(conn, table):
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


#: File systems where SQLite's file locking cannot be trusted.
_NETWORK_FS = frozenset(("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "afs",
                         "ncpfs", "ceph", "fuse.ceph", "glusterfs", "fuse.glusterfs", "lustre",
                         "gpfs"))


def _network_fs(path, mounts):
    """The network file system type holding ``path``, or None; ``mounts`` is
    the text of /proc/self/mounts (the mount point nearest to the path wins)."""
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind if kind in _NETWORK_FS else None


def _read_text(path):
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _file_identity(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _job_outcome(outcome, worker_id, now):
    """Parameters of the fenced update that records an outcome."""
    if outcome.retry_at is None:
        return outcome.doc["status"], now, 0, outcome.doc["id"], worker_id, outcome.lease
    return "pending", None, outcome.retry_at, outcome.doc["id"], worker_id, outcome.lease


def _claimed_doc(task_id, raw, worker_id, now):
    doc = _load_doc(task_id, raw) if raw is not None else _corrupt_doc(task_id)
    if doc.get("status") != "running":  # corrupt: still ours to fail
        doc.update(status="running", started_at=_iso(now), worker=worker_id)
    return doc


def _worker_row(wid, pid, host, started, beat, info, age):
    row = {"id": wid, "pid": pid, "host": host, "started_at": _iso(started),
           "heartbeat_at": _iso(beat), "beat": beat, "age": age}
    with contextlib.suppress(TypeError, ValueError):
        extra = json.loads(info) if isinstance(info, str) else info
        if isinstance(extra, dict):
            row.update((k, v) for k, v in extra.items() if k not in row)
    return row


# Storage: PostgreSQL ##########################################################
#
# ``Manager("postgresql://user@host/db")``: the same operations on a server
# that workers on several hosts share. One table holds the tasks: the
# document as jsonb (``psql -c "SELECT doc FROM castor_tasks"`` reads it) and
# beside it the columns that queue, claim and fence it. Claims take due rows
# in batches with ``FOR UPDATE SKIP LOCKED``, so workers never wait for each
# other; an enqueue sends NOTIFY in its transaction, and idle workers LISTEN
# (a thread of theirs turns notifications into wake-ups). Leases and due
# times use the server's clock, so hosts with skewed clocks agree: times
# cross the store interface as local POSIX times and are turned into server
# times inside the SQL (``_PG_AT``).
#
# Connections: a small pool per process (at most PG_POOL_SIZE, opened on
# first use, never across fork), plus one listening connection in a worker.
# A dropped connection is replaced; the application's calls wait up to
# PG_OUTAGE_WAIT for the server to come back, then raise StoreError. The
# worker's calls fail at once, and the worker loop rides the outage out.

#: Connections a process may open to the server, besides a worker's listener.
PG_POOL_SIZE = 3

#: How long the application's calls (``.delay()``, ``join``) wait for a server
#: that is down or unreachable before they raise StoreError.
PG_OUTAGE_WAIT = 10.0

#: A listening worker looks for work this often even without a notification.
PG_SAFETY_POLL = 5.0

#: Connection settings that notice a dead server or a cut link in seconds, not
#: minutes; a connection string may set its own.
_PG_SETTINGS = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 2,
                "keepalives_interval": 1, "keepalives_count": 3, "tcp_user_timeout": 5000,
                "application_name": "castor"}

#: The server's clock, in POSIX seconds.
_PG_NOW = "extract(epoch from clock_timestamp())"

#: A local time turned into a server time: the parameter is ``ts - time.time()``.
_PG_AT = f"({_PG_NOW} + %s)"

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS castor_tasks (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    name text NOT NULL,
    mode text NOT NULL,
    status text NOT NULL,
    priority integer NOT NULL DEFAULT 0,
    eta double precision NOT NULL DEFAULT extract(epoch from clock_timestamp()),
    worker text,
    lease integer NOT NULL DEFAULT 0,
    losses integer NOT NULL DEFAULT 0,
    finished double precision,
    unique_key text,
    cancel boolean NOT NULL DEFAULT false,
    doc jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS castor_tasks_ready
    ON castor_tasks (mode, priority, seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS castor_tasks_eta ON castor_tasks (mode, eta) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS castor_tasks_running ON castor_tasks (worker) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS castor_tasks_done ON castor_tasks (status, seq)
    WHERE finished IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS castor_tasks_unique ON castor_tasks (unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('pending', 'running');
CREATE TABLE IF NOT EXISTS castor_workers (
    id text PRIMARY KEY,
    pid integer NOT NULL,
    host text NOT NULL,
    started double precision NOT NULL,
    heartbeat double precision NOT NULL,
    info jsonb
);
CREATE TABLE IF NOT EXISTS castor_stats (
    status text NOT NULL,
    shard integer NOT NULL,
    n bigint NOT NULL,
    PRIMARY KEY (status, shard)
);
CREATE TABLE IF NOT EXISTS castor_periodic (
    name text PRIMARY KEY,
    next_run double precision NOT NULL
)
"""

#: New tasks, their documents sent as one JSON array: one text parameter is
#: far cheaper for the driver than an array of documents, escaped one by one.
#: ROWS FROM zips the arrays side by side. (A join on their ordinality can be
#: planned as a nested loop that unpacks one array again for each element of
#: the other: time that grows with the square of the batch.)
_PG_ADD = f"""
INSERT INTO castor_tasks (id, name, mode, status, priority, eta, unique_key, doc)
SELECT d ->> 'id', d ->> 'task_name', d ->> 'mode', 'pending', (d ->> 'priority')::int,
       {_PG_NOW} + v.delay, v.unique_key, d
FROM ROWS FROM (jsonb_array_elements(%s::jsonb), unnest(%s::float8[]), unnest(%s::text[]))
    AS v(d, delay, unique_key)
ON CONFLICT DO NOTHING"""

#: Wakes the listening workers when the transaction it is in commits.
_PG_NOTIFY = "SELECT pg_notify('castor', '')"

#: New tasks and their wake-up in one statement: a transaction by itself (see _do).
_PG_ADD_NOTIFY = f"WITH added AS ({_PG_ADD} RETURNING 1) {_PG_NOTIFY}"

#: A .map() this big (of a task that is not unique) goes in by COPY: the
#: server parses each document on its own as the rows stream in, while castor
#: makes the next ones, instead of one array of them parsed whole at the end.
PG_COPY_AT = 64

#: The columns a COPY gives; the due time is the column's default, the server's now.
_PG_COPY = "COPY castor_tasks (id, name, mode, status, priority, doc) FROM STDIN"

#: Finished counts are kept in PG_STAT_SHARDS rows a status, summed when read:
#: workers that record at the same time bump different rows, so they never
#: wait for each other's commit on one hot counter row.
PG_STAT_SHARDS = 16

_PG_BUMP = ("INSERT INTO castor_stats (status, shard, n) VALUES (%s, %s, %s) "
            "ON CONFLICT (status, shard) DO UPDATE SET n = castor_stats.n + excluded.n")

#: A claim: due rows nobody else holds, marked running for this worker, their
#: documents rewritten in the same statement.
_PG_CLAIM = """
WITH picked AS (
    SELECT seq FROM castor_tasks WHERE {where}
    ORDER BY priority, seq LIMIT %s FOR UPDATE SKIP LOCKED
)
UPDATE castor_tasks t SET status = 'running', worker = %s, lease = t.lease + 1,
    doc = CASE WHEN jsonb_typeof(t.doc) = 'object' THEN t.doc || jsonb_build_object(
        'status', 'running', 'started_at', %s::text, 'worker', %s::text, 'attempts',
        CASE WHEN jsonb_typeof(t.doc -> 'attempts') = 'number'
             THEN floor((t.doc ->> 'attempts')::numeric)::bigint + 1 ELSE 1 END)
        ELSE t.doc END
FROM picked WHERE t.seq = picked.seq
RETURNING t.priority, t.seq, t.id, t.lease, t.doc, t.cancel"""

_PG_READY = f"status = 'pending' AND mode = %s AND eta <= {_PG_NOW}"

#: Claims walk the ready index in queue order and stop after their batch. A
#: table not analysed since a burst of tasks (autovacuum looks once a minute)
#: has statistics that count few pending rows, and the planner then reads and
#: sorts every pending row for each claim: measured, 126-227 ms instead of 14 ms
#: a claim of 256 from a backlog of 100,000, and a session keeps such a plan
#: once its prepared statement settles on it. With sorting off for the rest of
#: the transaction, no plan that sorts can win where another can: the queries
#: that follow in it (claims and the next due time) have an index in their
#: order, except a limited claim's final one by seq, which has no plan but a
#: sort of the few rows picked. Such a plan then costs the planner's penalty
#: for a disabled step (10^10), far past the cost at which the server compiles
#: a query with JIT: 200-250 ms a claim, measured. So JIT goes off too: castor's
#: statements are all short. Each statement after this always runs with these
#: settings, so the generic plan a session caches for it is made with them too.
_PG_CLAIM_SETTINGS = "SELECT set_config('enable_sort', 'off', true), set_config('jit', 'off', true)"

#: Outcomes recorded in one statement, fenced by worker and lease.
_PG_RECORD = f"""
WITH v AS (  -- documents, and [id, status, lease, delay] of each: two JSON arrays, zipped
    SELECT e.doc, e.f ->> 0 AS id, e.f ->> 1 AS status, (e.f ->> 2)::int AS lease,
        (e.f ->> 3)::float8 AS delay
    FROM ROWS FROM (jsonb_array_elements(%s::jsonb), jsonb_array_elements(%s::jsonb)) AS e(doc, f)
), recorded AS (
    UPDATE castor_tasks t SET status = v.status, doc = v.doc,
        finished = CASE WHEN v.status = 'pending' THEN NULL ELSE {_PG_NOW} END,
        eta = CASE WHEN v.status = 'pending' THEN {_PG_NOW} + v.delay ELSE t.eta END
    FROM v WHERE t.id = v.id AND t.worker = %s AND t.lease = v.lease AND t.status = 'running'
    RETURNING t.id, v.status
), counted AS (  -- in status order, as every bump: no deadlock between workers
    INSERT INTO castor_stats (status, shard, n)
    SELECT status, %s, count(*) FROM recorded WHERE status <> 'pending' GROUP BY status
    ORDER BY status
    ON CONFLICT (status, shard) DO UPDATE SET n = castor_stats.n + excluded.n
)
SELECT id FROM recorded"""

#: pending, running, and {status: n} of finished tasks, in one snapshot.
_PG_COUNTS = """
SELECT (SELECT count(*) FROM castor_tasks WHERE status = 'pending'),
       (SELECT count(*) FROM castor_tasks WHERE status = 'running'),
       (SELECT coalesce(jsonb_object_agg(status, n), '{}') FROM
           (SELECT status, sum(n) AS n FROM castor_stats GROUP BY status) AS s)"""

_PG_PROGRESS = ("UPDATE castor_tasks SET doc = jsonb_set(doc, '{progress}', %s::jsonb) "
                "WHERE id = %s AND status = 'running'")
#: The next due time, as seconds from now; no row when nothing is pending.
#: Not min(eta): planned from statistics taken while the table was empty, it
#: read every pending row, where the index in eta order stops at the first.
_PG_NEXT_ETA = (f"SELECT eta - {_PG_NOW} FROM castor_tasks WHERE status = 'pending' "
                "AND mode = %s ORDER BY eta LIMIT 1")


class _PgConnections(_Store):
    """A PostgreSQL server: castor's connections to it, its schema, and
    transactions that ride out a server gone for a moment."""

    #: A commit here is a network round trip and a WAL flush on the server:
    #: claim further ahead, so a drain needs fewer of them (see _Store).
    claim_ahead = 8

    def __init__(self, dsn):
        try:
            import psycopg
        except ImportError:
            raise CastorError("the PostgreSQL store needs psycopg 3: "
                              "pip install 'castor-io[postgres]' (or 'psycopg[binary]')") from None
        self.psycopg = psycopg
        params = _pg_params(psycopg, dsn)
        self.name = _pg_name(params)
        self._secrets = [s for s in (params.get("password"), dsn) if s]
        self._pool = _PgPool(self._connect_with(params), PG_POOL_SIZE)
        self._params = params
        self._schema_ready = False
        self._listeners = []

    def explain(self, exc):
        """An error's text with no password in it, and where it happened."""
        text = str(exc).strip() or type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return f"PostgreSQL at {self.name}: {text}"

    def _connect_with(self, params):
        def connect():
            conn = self.psycopg.connect(**params, autocommit=True)
            if not self._schema_ready:
                self._create_schema(conn)
            return conn
        return connect

    def _create_schema(self, conn):
        with conn.transaction():
            # One at a time: concurrent CREATE ... IF NOT EXISTS can still collide.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('castor schema'))")
            for statement in _PG_SCHEMA.split(";"):
                conn.execute(statement)
        self._schema_ready = True

    def _do(self, work, wait=True, pipeline=False, block=True):
        """Run ``work(cursor)`` in a transaction. Connection trouble is retried
        for up to PG_OUTAGE_WAIT when ``wait`` (the work must be safe to
        repeat); in the end any error leaves as StoreError. With ``pipeline``,
        statements go out without waiting for each other's answers (psycopg's
        pipeline mode): a transaction that reads nothing back before its end
        costs one round trip to the server instead of one a statement.

        ``block=False`` leaves out BEGIN and COMMIT, which cost psycopg more
        than the statements of a short transaction: a single statement is a
        transaction by itself, and so are a pipeline's statements, up to the
        Sync that ends the pipeline (the server's rule for an implicit
        transaction). Not for work that must hold locks across a read it waits
        for: psycopg may sync there."""
        psycopg = self.psycopg
        deadline = time.monotonic() + (PG_OUTAGE_WAIT if wait else 0.0)
        pause = 0.05
        while True:
            try:
                with self._pool.connection() as conn, (
                        conn.pipeline() if pipeline else contextlib.nullcontext()), (
                        conn.transaction() if block else contextlib.nullcontext()):
                    return work(conn.cursor())
            except psycopg.OperationalError as exc:  # down, unreachable, restarted
                if (exc.sqlstate or "").startswith("54"):  # a limit of the server's: no outage
                    raise StoreError(self.explain(exc)) from None
                if time.monotonic() + pause > deadline:
                    raise StoreError(self.explain(exc)) from None
            except psycopg.DataError as exc:  # a value jsonb refuses
                raise _Unstorable(self.explain(exc)) from None
            except psycopg.Error as exc:
                raise StoreError(self.explain(exc)) from None
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def version(self):
        return None  # a result recorded sends no notification: read the document

    def news(self):
        listeners = self._open_listeners()
        return sum(listener.version for listener in listeners) if listeners else None

    def watch(self):
        # A listener each: the worker that asked closes it when it stops, and
        # another worker on this store (the next one, or one beside it) must
        # not be left selecting on its closed pipe.
        self._listeners = self._open_listeners() + [_PgListener(self)]
        return self._listeners[-1]

    def _open_listeners(self):
        return [listener for listener in self._listeners if not listener.closed]

    def close(self):
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        self._pool.close()


class _PgTasks(_PgConnections):
    """PostgreSQL, the application's side: add, read, cancel, re-drive."""

    def enqueue(self, new):
        for item in new:
            _pg_check_storable(item.raw, f"the arguments of {item.doc['task_name']}")
        if all(item.unique_key is None for item in new):  # one statement, unless huge
            return self._do(lambda cur: self._add(cur, new),
                            block=sum(len(item.raw) for item in new) > PG_BATCH_BYTES)
        return self._do(lambda cur: self._add(cur, new), pipeline=True)

    def enqueue_batch(self, make, batch):
        if len(batch) < PG_COPY_AT or make.unique:
            return super().enqueue_batch(make, batch)
        made = []
        return self._do(lambda cur: self._copy(cur, make, batch, made))

    def _copy(self, cur, make, batch, made):
        """The tasks of a .map(), made as COPY streams them. COPY cannot skip an
        id already there: a retry (the first commit may have landed) inserts."""
        if made:
            made += [make(args) for args in batch[len(made):]]
            return self._add(cur, made)
        with cur.copy(_PG_COPY) as copy:
            for args in batch:
                item = make(args)
                _pg_check_storable(item.raw, make.where)
                made.append(item)
                doc = item.doc
                copy.write_row((doc["id"], doc["task_name"], doc["mode"], "pending",
                                doc["priority"], item.raw))
        cur.execute(_PG_NOTIFY)
        return [item.doc["id"] for item in made]

    def _add(self, cur, new):
        """Insert the new tasks; an id already there (a retried commit) stays as is."""
        ids, fresh, batch = [], [], {}  # batch: unique key -> its task earlier in this batch
        for item in new:
            task_id = batch.get(item.unique_key) or self._existing(cur, item)
            if task_id is None:
                fresh.append(item)
                if item.unique_key is not None:
                    batch[item.unique_key] = item.doc["id"]
            ids.append(task_id)
        if fresh and all(item.unique_key is None for item in fresh):
            for chunk in _pg_chunks(fresh):
                cur.execute(_PG_ADD_NOTIFY, _pg_columns(chunk, time.time()))
        elif fresh:
            added = {task_id for chunk in _pg_chunks(fresh) for (task_id,) in cur.execute(
                _PG_ADD + " RETURNING id", _pg_columns(chunk, time.time())).fetchall()}
            cur.execute(_PG_NOTIFY)
            twins = {item.doc["id"]: self._twin(cur, item) for item in fresh
                     if item.doc["id"] not in added and item.unique_key is not None}
            ids = [task_id or twins.get(item.doc["id"]) for item, task_id in zip(new, ids)]
        return [task_id or item.doc["id"] for item, task_id in zip(new, ids)]

    def _twin(self, cur, item):
        """The task a unique task's insert gave way to: the twin another
        transaction made pending (a re-drive) while ours waited for it, or our
        own row (a retried commit that had landed)."""
        row = cur.execute(
            "SELECT id FROM castor_tasks WHERE id = %s OR (unique_key = %s AND status IN "
            "('pending', 'running')) ORDER BY id = %s DESC LIMIT 1",
            (item.doc["id"], item.unique_key, item.doc["id"])).fetchone()
        if row is None:  # the twin finished meanwhile: ours goes in after all
            return self._add(cur, [item])[0]
        return row[0]

    def _existing(self, cur, item):
        """The pending or running task a unique task matches, or None."""
        if item.unique_key is None:
            return None
        # The lock makes two producers of the same key take turns.
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (item.unique_key,))
        row = cur.execute("SELECT id FROM castor_tasks WHERE unique_key = %s AND status IN "
                          "('pending', 'running')", (item.unique_key,)).fetchone()
        return row[0] if row else None

    def check_storable(self, raw, where):
        _pg_check_storable(raw, where)

    def put_finished(self, doc):
        def work(cur, raw):
            cur.execute(f"INSERT INTO castor_tasks (id, name, mode, status, finished, doc) "
                        f"VALUES (%s, %s, %s, %s, {_PG_NOW}, %s::jsonb) ON CONFLICT DO NOTHING",
                        (doc["id"], doc["task_name"], doc["mode"], doc["status"], raw))
            if cur.rowcount:
                _pg_bump(cur, {doc["status"]: 1})
        self._put_outcome(doc, work)

    def finish_pending(self, doc):
        def work(cur, raw):
            cur.execute(f"UPDATE castor_tasks SET status = %s, finished = {_PG_NOW}, "
                        "doc = %s::jsonb WHERE id = %s AND status = 'pending'",
                        (doc["status"], raw, doc["id"]))
            if cur.rowcount:
                _pg_bump(cur, {doc["status"]: 1})
            return cur.rowcount == 1
        return self._put_outcome(doc, work)

    def _put_outcome(self, doc, work):
        """``work(cur, raw)`` with an immediate mode run's document, made
        storable as a worker's outcome is (see _pg_storable_outcome)."""
        outcome = _Outcome(doc, _dumps(doc), None, 0)
        _pg_storable_outcome(outcome)
        try:
            return self._do(lambda cur: work(cur, outcome.raw))
        except _Unstorable:  # a lone surrogate
            self._make_storable([outcome], {})
            return self._do(lambda cur: work(cur, outcome.raw))

    def get(self, task_id):
        if _no_task_has(task_id):  # then no task has it
            return None
        row = self._do(lambda cur: cur.execute(
            "SELECT doc FROM castor_tasks WHERE id = %s", (task_id,)).fetchone(), block=False)
        return None if row is None else _load_doc(task_id, row[0])

    def list(self, status, name, limit, offset):
        if name is not None and _no_task_has(name):  # then no task has it
            return []
        terms, params = ["true"], []
        if status is not None:
            terms.append("status = %s" + (" AND finished IS NOT NULL" if status in FINISHED
                                           else ""))
            params.append(status)
        if name is not None:
            terms.append("name = %s")
            params.append(name)
        rows = self._do(lambda cur: cur.execute(
            f"SELECT id, doc FROM castor_tasks WHERE {' AND '.join(terms)} "
            "ORDER BY seq DESC LIMIT %s OFFSET %s", (*params, limit, offset)).fetchall(),
            block=False)
        return [_load_doc(task_id, doc) for task_id, doc in rows]

    def counts(self):
        def work(cur):
            # One statement, so one snapshot: three would each see a drain at
            # another moment, and the counts would not add up.
            pending, running, finished = cur.execute(_PG_COUNTS).fetchone()
            return dict(dict.fromkeys(STATUSES, 0), pending=pending, running=running,
                        **{status: int(n) for status, n in finished.items()})
        return self._do(work)

    def prune(self, before):
        def work(cur):
            rows = cur.execute(f"DELETE FROM castor_tasks WHERE finished IS NOT NULL AND "
                               f"finished < {_PG_AT} RETURNING status",
                               (before - time.time(),)).fetchall()
            _pg_bump(cur, collections.Counter(status for (status,) in rows), -1)
            return len(rows)
        return self._do(work)

    def cancel(self, task_id, now):
        if _no_task_has(task_id):  # then no task has it
            return False

        def work(cur):
            row = cur.execute("SELECT status, doc FROM castor_tasks WHERE id = %s FOR UPDATE",
                              (task_id,)).fetchone()
            if row is None or row[0] in FINISHED:
                return False
            if row[0] == "running":
                cur.execute("UPDATE castor_tasks SET cancel = true WHERE id = %s", (task_id,))
                return True
            doc = _load_doc(task_id, row[1])
            doc.update(status="cancelled", finished_at=_iso(now))
            cur.execute(f"UPDATE castor_tasks SET status = 'cancelled', finished = {_PG_NOW}, "
                        "doc = %s::jsonb WHERE id = %s", (_dumps(doc), task_id))
            _pg_bump(cur, {"cancelled": 1})
            return True
        return self._do(work)

    def requeue(self, ids, status, name, now):
        ids, findable = _findable(ids, name)
        if not findable:
            return []

        def work(cur):
            if ids is not None:
                rows = cur.execute("SELECT id, status, doc FROM castor_tasks WHERE id = ANY(%s) "
                                   "AND status IN ('failed', 'cancelled') FOR UPDATE",
                                   (list(ids),)).fetchall()
            else:
                rows = cur.execute(
                    "SELECT id, status, doc FROM castor_tasks WHERE status = %s AND finished "
                    "IS NOT NULL AND (%s::text IS NULL OR name = %s) FOR UPDATE",
                    (status, name, name)).fetchall()
            redriven = [(task_id, was) for task_id, was, doc in rows
                        if self._redrive(cur, task_id, doc, now)]
            _pg_bump(cur, collections.Counter(was for _, was in redriven), -1)
            if redriven:
                cur.execute(_PG_NOTIFY)
            return [task_id for task_id, _ in redriven]
        return self._do(work)

    def _redrive(self, cur, task_id, doc, now):
        """One task back to pending; False if a twin (unique) is already pending."""
        doc = _redriven(_load_doc(task_id, doc), now)
        try:
            with cur.connection.transaction():  # a savepoint: a clash undoes only this row
                cur.execute(f"UPDATE castor_tasks SET status = 'pending', finished = NULL, "
                            f"eta = {_PG_NOW}, cancel = false, losses = 0, doc = %s::jsonb "
                            "WHERE id = %s", (_dumps(doc), task_id))
        except self.psycopg.errors.UniqueViolation:
            return False
        return True


class _PostgresStore(_PgTasks):
    """The store on a PostgreSQL server (psycopg 3), for workers on several
    hosts: the worker's side on top of the application's."""

    def exchange(self, worker_id, outcomes, progress, wants, limits, now):
        def work(cur):
            conn, done = cur.connection, _Exchange()
            # Everything goes out before anything is read back: one round trip.
            recorded = self._send_record(conn, worker_id, outcomes)
            for task_id, report in progress.items():
                conn.execute(_PG_PROGRESS, (_dumps(report), task_id))
            if wants:
                conn.execute(_PG_CLAIM_SETTINGS)
            claims = {mode: self._send_claim(conn, worker_id, mode, n, idle, limits, now)
                      for mode, (n, idle) in wants.items()}
            etas = {mode: conn.execute(_PG_NEXT_ETA, (mode,)) for mode in wants}
            self._sort_outcomes(cur, worker_id, outcomes, recorded, done)
            for mode, (n, _) in wants.items():
                done.claimed[mode] = _pg_claimed(claims[mode].fetchall(), worker_id, now)
                if len(done.claimed[mode]) < n:
                    done.idle[mode] = _pg_local_time(etas[mode].fetchone())
            return done
        block = bool(limits)  # their advisory locks must outlast reads: see _do
        try:
            return self._do(work, wait=False, pipeline=True, block=block)
        except _Unstorable:  # a result or report jsonb refuses: it must not block the rest
            self._make_storable(outcomes, progress)
            return self._do(work, wait=False, pipeline=True, block=block)

    def _make_storable(self, outcomes, progress):
        """Outcomes jsonb refuses become failures that say so; such reports go."""
        def storable(raw):
            try:
                self._do(lambda cur: cur.execute("SELECT %s::jsonb", (raw,)), wait=False,
                         block=False)
                return True
            except _Unstorable:
                return False
        for outcome in outcomes:
            _pg_make_storable(outcome, lambda raw: not storable(raw),
                              "the result cannot be stored in PostgreSQL's JSON "
                              "(a lone surrogate or a NUL character in a string)")
        for task_id in [key for key, report in progress.items() if not storable(_dumps(report))]:
            del progress[task_id]

    def _send_record(self, conn, worker_id, outcomes):
        """Send the fenced updates of the outcomes (and their counts); their cursors."""
        clock = time.time()
        for outcome in outcomes:
            _pg_storable_outcome(outcome)
        return [self._send_record_of(conn, worker_id, chunk, clock)
                for chunk in _pg_chunks(outcomes)]

    def _send_record_of(self, conn, worker_id, outcomes, clock):
        # One JSON array, not four typed ones: psycopg dumps arrays in Python.
        fields = _dumps([[o.doc["id"], o.doc["status"], o.lease,
                          0.0 if o.retry_at is None else o.retry_at - clock] for o in outcomes])
        return conn.execute(_PG_RECORD, ("[" + ",".join(o.raw for o in outcomes) + "]", fields,
                                         worker_id, _pg_shard(worker_id)))

    def _sort_outcomes(self, cur, worker_id, outcomes, recorded, done):
        """Recorded or refused (their lease moved on), from the updates' answers."""
        if not recorded:
            return
        held = {task_id for cursor in recorded for (task_id,) in cursor.fetchall()}
        held |= self._recorded_before(cur, worker_id, [o for o in outcomes if o.doc["id"]
                                                       not in held])
        for outcome in outcomes:
            (done.recorded if outcome.doc["id"] in held else done.refused).append(outcome)

    def _recorded_before(self, cur, worker_id, outcomes):
        """Ids among ``outcomes`` that a commit we could not confirm (the
        connection broke) already recorded: not a lost lease."""
        if not outcomes:
            return set()
        rows = cur.execute("SELECT id, lease, status FROM castor_tasks WHERE id = ANY(%s) AND "
                           "worker = %s", ([o.doc["id"] for o in outcomes], worker_id))
        mine = {(task_id, lease, status) for task_id, lease, status in rows.fetchall()}
        return {o.doc["id"] for o in outcomes if (
            o.doc["id"], o.lease, o.doc["status"]) in mine}

    def _send_claim(self, conn, worker_id, mode, n, idle, limits, now):
        """Send the claim of up to ``n`` due tasks of ``mode``; its cursor."""
        if limits:
            seqs = self._pick_limited(conn.cursor(), mode, n, idle, limits)
            where, params = "seq = ANY(%s)", [seqs]  # the few rows picked, then sorted
        else:
            where, params = _PG_READY, [mode]
        return conn.execute(_PG_CLAIM.format(where=where),
                            (*params, n, worker_id, _iso(now), worker_id))

    def _pick_limited(self, cur, mode, n, idle, limits):
        """As _SqliteStore._pick_limited; the advisory locks make workers
        count the running ones in turn."""
        for name in sorted(limits):
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"castor:{name}",))
        room = _Room(limits, idle, cur.execute(
            "SELECT name, count(*) FROM castor_tasks WHERE status = 'running' AND "
            "name = ANY(%s) GROUP BY name", (list(limits),)).fetchall())

        def due(full, picked, k):
            return cur.execute(
                f"SELECT seq, name FROM castor_tasks WHERE {_PG_READY} AND NOT (name = ANY(%s)) "
                "AND NOT (seq = ANY(%s)) ORDER BY priority, seq LIMIT %s FOR UPDATE SKIP LOCKED",
                (mode, full, picked, k)).fetchall()
        return room.pick(n, due)

    def cancel_requests(self, worker_id):
        rows = self._do(lambda cur: cur.execute(
            "SELECT id FROM castor_tasks WHERE status = 'running' AND worker = %s AND cancel",
            (worker_id,)).fetchall(), wait=False, block=False)
        return {task_id for (task_id,) in rows}

    def register(self, worker_id, info, now):
        self._do(lambda cur: cur.execute(
            f"INSERT INTO castor_workers (id, pid, host, started, heartbeat, info) VALUES "
            f"(%s, %s, %s, {_PG_NOW}, {_PG_NOW}, %s::jsonb) ON CONFLICT (id) DO UPDATE SET "
            "heartbeat = excluded.heartbeat, info = excluded.info",
            (worker_id, os.getpid(), _host_id(), _dumps(info))), wait=False, block=False)

    def heartbeat(self, worker_id, now):
        return self._do(lambda cur: cur.execute(
            f"UPDATE castor_workers SET heartbeat = {_PG_NOW} WHERE id = %s",
            (worker_id,)).rowcount == 1, wait=False, block=False)

    def deregister(self, worker_id):
        self._do(lambda cur: cur.execute("DELETE FROM castor_workers WHERE id = %s",
                                         (worker_id,)), wait=False, block=False)

    def workers(self):
        rows = self._do(lambda cur: cur.execute(
            f"SELECT id, pid, host, started, heartbeat, info, {_PG_NOW} - heartbeat "
            "FROM castor_workers ORDER BY started").fetchall(), block=False)
        return [_worker_row(*row[:6], age=row[6]) for row in rows]

    def reap(self, dead, now, verdict):
        orphans = ("status = 'running' AND (worker IS NULL OR NOT EXISTS (SELECT 1 FROM "
                   "castor_workers w WHERE w.id = t.worker))")

        def work(cur):
            for wid, beat in dead.items():
                cur.execute("DELETE FROM castor_workers WHERE id = %s AND heartbeat = %s",
                            (wid, beat))
            rows = cur.execute(f"SELECT id, losses, cancel, doc FROM castor_tasks t WHERE "
                               f"{orphans} FOR UPDATE SKIP LOCKED").fetchall()
            return self._give_back(cur, rows, 1, now, verdict)
        if not dead and not self._do(lambda cur: cur.execute(
                f"SELECT 1 FROM castor_tasks t WHERE {orphans} LIMIT 1").fetchone(),
                wait=False, block=False):
            return []
        return self._do(work, wait=False)

    def release(self, worker_id, now, verdict, keep=()):
        def work(cur):
            rows = cur.execute("SELECT id, losses, cancel, doc FROM castor_tasks WHERE status = "
                               "'running' AND worker = %s AND NOT (id = ANY(%s)) FOR UPDATE",
                               (worker_id, list(keep))).fetchall()
            return self._give_back(cur, rows, 0, now, verdict)
        return self._do(work, wait=False)

    def _give_back(self, cur, rows, loss, now, verdict):
        docs = []
        for task_id, losses, cancel, raw in rows:
            doc = verdict(_load_doc(task_id, raw), losses + loss, cancel, now)
            final = doc["status"] in FINISHED
            cur.execute(f"UPDATE castor_tasks SET status = %s, worker = NULL, losses = %s, "
                        f"finished = CASE WHEN %s THEN {_PG_NOW} END, doc = %s::jsonb "
                        "WHERE id = %s", (doc["status"], losses + loss, final, _dumps(doc),
                                          task_id))
            docs.append(doc)
        _pg_bump(cur, collections.Counter(d["status"] for d in docs if d["status"] in FINISHED))
        if any(doc["status"] == "pending" for doc in docs):
            cur.execute(_PG_NOTIFY)
        return docs

    def periodic(self):
        # Slots are kept in the firing workers' own clock, compared exactly
        # like a version number: converting them through the server's clock
        # would blur the compare-and-set below.
        return dict(self._do(lambda cur: cur.execute(
            "SELECT name, next_run FROM castor_periodic").fetchall(), block=False))

    def fire_periodic(self, name, expected, next_run, new):
        def work(cur):
            if expected is None:
                cur.execute("INSERT INTO castor_periodic VALUES (%s, %s) ON CONFLICT DO NOTHING",
                            (name, next_run))
            else:
                cur.execute("UPDATE castor_periodic SET next_run = %s WHERE name = %s AND "
                            "next_run = %s", (next_run, name, expected))
            won = cur.rowcount == 1
            if won and new is not None:
                self._add(cur, [new])
            return won
        return self._do(work, wait=False)


def _pg_params(psycopg, dsn):
    """The connection string as parameters, castor's defaults under the user's."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise ValueError("not a valid PostgreSQL connection string (postgresql://user@host"
                         ":5432/dbname)") from None
    return {**_PG_SETTINGS, **params}


def _pg_name(params):
    """``postgresql://user@host:port/db``: what logs show, never the password."""
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{params.get('host', 'localhost')}{port}/{params.get('dbname', '')}"


#: The most JSON one statement sends as one array of documents (a .map(),
#: a worker's outcomes): PostgreSQL refuses a jsonb value over 256 MiB.
PG_BATCH_BYTES = 64 * 2 ** 20


def _pg_chunks(items):
    """``items`` (each with its JSON in .raw) in runs of at most PG_BATCH_BYTES
    (a bigger one alone)."""
    chunk, size = [], 0
    for item in items:
        if chunk and size + len(item.raw) > PG_BATCH_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += len(item.raw)
    if chunk:
        yield chunk


def _pg_columns(new, clock):
    """The parameters of one multi-row insert."""
    return ("[" + ",".join(item.raw for item in new) + "]",
            [item.eta - clock for item in new], [item.unique_key for item in new])


def _pg_claimed(rows, worker_id, now):
    """[(doc, lease, cancel)] of a claim's rows, in queue order (RETURNING has none)."""
    return [(_claimed_doc(task_id, doc, worker_id, now), lease, cancel)
            for _, _, task_id, lease, doc, cancel in sorted(rows, key=lambda r: (r[0], r[1]))]


def _pg_local_time(row):
    """A due time the server gave as seconds from its now (a row of one, or
    None for no row), on our clock."""
    return None if row is None else time.time() + row[0]


def _pg_check_storable(raw, where):
    # jsonb refuses the NUL character and lone surrogates; JSON allows them,
    # so say so plainly.
    if _has_nul(raw):
        raise NotJSONError(f"{where} contain the NUL character (\\u0000), which PostgreSQL "
                           "cannot store in JSON")
    if _has_lone_surrogate(raw):
        raise NotJSONError(f"{where} contain a lone surrogate (text that is not valid "
                           "Unicode, as os.fsdecode makes of some file names), which "
                           "PostgreSQL cannot store in JSON")


def _has_lone_surrogate(raw):
    if "\\ud" not in raw:  # every surrogate is escaped so, paired or not
        return False
    try:  # rare: an emoji, say, escaped as a pair; decode, and see what is left
        json.dumps(json.loads(raw), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


#: The escape of a NUL character in JSON text: ``\u0000`` after an even number
#: of backslashes (``\\u0000`` is a backslash, then the text "u0000").
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _has_nul(raw):
    return "\\u0000" in raw and _JSON_NUL.search(raw) is not None


def _pg_storable_outcome(outcome):
    _pg_make_storable(outcome, _has_nul, "the result contains the NUL character (\\u0000), "
                      "which PostgreSQL cannot store in JSON")


def _pg_make_storable(outcome, unstorable, why):
    """An outcome PostgreSQL cannot store (``unstorable(raw)``) becomes one that
    can be: a failure's error made printable, else a failure that says ``why``."""
    if unstorable(outcome.raw) and not (_pg_clean_error(outcome)
                                        and not unstorable(outcome.raw)):
        _make_failed(outcome, why)


def _pg_clean_error(outcome):
    """A failed attempt's error with NUL characters and lone surrogates shown
    as escapes, so it can be stored with its retries intact; True if it had one."""
    doc = outcome.doc
    if doc.get("error") is None and doc.get("exception") is None:
        return False
    doc["error"], doc["exception"] = _printable(doc.get("error")), _printable(doc.get("exception"))
    outcome.raw = _dumps(doc)
    return True


def _printable(value):
    if isinstance(value, str):
        return value.replace("\0", "\\x00").encode("utf-8", "backslashreplace").decode()
    if isinstance(value, list):
        return [_printable(item) for item in value]
    if isinstance(value, dict):
        return {key: _printable(item) for key, item in value.items()}
    return value


def _make_failed(outcome, message):
    doc = outcome.doc
    _finish_doc(doc, _failed(message), time.time())
    outcome.raw, outcome.retry_at = _dumps(doc), None


def _pg_bump(cur, counter, sign=1):
    shard = random.randrange(PG_STAT_SHARDS)
    for status in sorted(counter):  # one order for all: no deadlock between workers
        if counter[status]:
            cur.execute(_PG_BUMP, (status, shard, sign * counter[status]))


def _pg_shard(worker_id):
    """A worker's own counter row (see PG_STAT_SHARDS)."""
    return sum(worker_id.encode()) % PG_STAT_SHARDS


class _PgPool:
    """A few connections for one process, each used by one thread at a time."""

    def __init__(self, connect, size):
        self._connect, self._size = connect, size
        self._cond = threading.Condition()
        self._idle, self._count, self._pid = [], 0, os.getpid()

    @contextlib.contextmanager
    def connection(self):
        conn = self._take()
        try:
            yield conn
        finally:
            self._give(conn)

    def _take(self):
        with self._cond:
            if self._pid != os.getpid():  # a forked child: the parent's are not ours
                self._idle, self._count, self._pid = [], 0, os.getpid()
            while not self._idle and self._count >= self._size:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._count += 1
        try:
            return self._connect()
        except BaseException:
            self._forget()
            raise

    def _give(self, conn):
        if conn.closed or conn.broken:
            with contextlib.suppress(Exception):
                conn.close()
            self._forget()
            return
        with self._cond:
            self._idle.append(conn)
            self._cond.notify()

    def _forget(self):
        with self._cond:
            self._count -= 1
            self._cond.notify()

    def close(self):
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()


class _PgListener:
    """A worker's LISTEN connection, in a thread of its own: it turns
    notifications into bytes on a pipe that the worker's select() watches,
    reconnects when the server goes away, and looks now and then anyway."""

    def __init__(self, store):
        self.store, self.version = store, 0
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        self._closed = threading.Event()
        threading.Thread(target=self._listen_forever, name="castor-listen", daemon=True).start()

    def fileno(self):
        return self._read

    def drain(self):
        _drain(self._read)

    @property
    def closed(self):
        return self._closed.is_set()

    def close(self):
        self._closed.set()  # its thread closes the pipe when it sees this

    def _listen_forever(self):
        pause = STORE_BACKOFF[0]
        while not self._closed.is_set():
            try:
                self._listen()
                pause = STORE_BACKOFF[0]
            except Exception as exc:  # the server went away: the worker loop says so
                logger.debug("listening connection lost: %s", self.store.explain(exc))
            self._wake()
            self._closed.wait(pause)
            pause = min(pause * 2, STORE_BACKOFF[1])
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _listen(self):
        with self.store.psycopg.connect(**self.store._params, autocommit=True) as conn:
            conn.execute("LISTEN castor")
            self._wake()  # notifications may have been missed while we were away
            last = time.monotonic()
            while not self._closed.is_set():
                for _ in conn.notifies(timeout=1.0):  # a second: close() is seen soon
                    self._wake()
                    last = time.monotonic()
                if time.monotonic() - last >= PG_SAFETY_POLL:  # the slow safety poll
                    self._wake()
                    last = time.monotonic()

    def _wake(self):
        self.version += 1
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._write, b"!")


# Worker #######################################################################
#
# The worker is a loop: record what finished and claim what is due (one
# store transaction), hand each claimed task to the pool of its mode, sleep
# until there is news. Its collaborators do the rest: _Heart (heartbeats and
# the reaping of dead workers), _Scheduler (periodic and cron tasks),
# _ClaimGate (which modes are worth a claim), the pools (one class per mode:
# see "Worker: pools"), and _Inbox (where runs end, and how the loop sleeps).


class _Run:
    """A task this worker is running."""

    __slots__ = ("doc", "lease", "task", "mode", "started", "ctx", "deadline")

    def __init__(self, doc, lease, task, started):
        self.doc, self.lease, self.task = doc, lease, task
        self.mode = task.mode if task is not None else "thread"
        self.ctx = TaskContext(doc["id"], doc.get("task_name"), _as_int(doc.get("attempts")))
        self.begin(started)

    def begin(self, now):
        """The run starts now (a pool may start it later than it was claimed)."""
        timeout = self.task.timeout if self.task is not None else None
        self.started, self.deadline = now, None if timeout is None else now + timeout

    @property
    def id(self):
        return self.doc["id"]

    @property
    def daemon(self):
        return self.task is not None and self.task.daemon


class Worker:
    """Runs a manager's tasks: threads for mode="thread", processes for
    "process", an event loop for "async".

    ``run()`` blocks until ``stop()`` or SIGINT/SIGTERM (in the main thread);
    a second signal exits at once and puts running tasks back to pending.
    """

    def __init__(self, manager, workers=None, threads=None, *, async_tasks=None,
                 target=None, imports=()):
        import socket
        self.manager = manager
        self.processes = workers or os.cpu_count() or 1
        self.threads = threads or self.processes * 2
        self.async_tasks = async_tasks or ASYNC_TASKS
        self.id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.target, self.imports = target, list(imports)
        self.state = "Idle"
        self._stop, self._abort = threading.Event(), threading.Event()
        self._inbox = _Inbox()
        self._pools, self._runs, self._unrecorded = {}, {}, []
        self._gate, self._trouble = _ClaimGate(), _Trouble()
        self._heart = self._scheduler = None
        self._rng = random.Random()
        self._next_look = self._next_progress = 0.0
        self._failure = None

    # Public -------------------------------------------------------------------

    def stop(self, now=False):
        """Stop claiming and finish running tasks; ``now=True`` gives them back."""
        (self._abort if now else self._stop).set()
        self._inbox.put(None)  # wake the loop

    def busy(self):
        """``{"thread": (busy, total), "process": (...), "async": (...)}``."""
        return {mode: (pool.busy(), pool.size) for mode, pool in list(self._pools.items())
                if not pool.sweep_only}

    @property
    def problem(self):
        """The store error the worker is riding out, or None."""
        return self._trouble.message

    def run(self):
        """Serve tasks until stopped. Returns 0 after a graceful stop, 1 if
        forced or if the store went away."""
        if os.environ.get("CASTOR_POOL_CHILD"):
            raise CastorError("a process-pool child imported a module that starts a worker: "
                              "put Worker(...).run() under `if __name__ == '__main__':`")
        # Fail here, before touching signals or the store.
        processes = any(t.mode == "process" for t in self.manager._tasks.values())
        config = _child_config(self.manager, self.target, self.imports) if processes else None
        restore = _install_signals(self._stop, self._abort, self._inbox.wakeup_fd)
        try:
            self.state = "Running"
            if self._start(config, time.time()):
                logger.info("Worker %s serving %d task(s) from %s", self.id,
                            len(self.manager._tasks), self.manager.path)
                self._serve()
        finally:
            forced = self._abort.is_set()
            self._shutdown(forced)
            restore()
            self.state = "Stopped"
        return 1 if forced or self._failure else 0

    # Loop ---------------------------------------------------------------------

    def _serve(self):
        while not self._abort.is_set():
            try:
                if self._tick(time.time()) and self._trouble.clear(len(self._unrecorded)):
                    self._release_unconfirmed()
            except _StoreGone as exc:
                self._fail(str(exc))
            except Exception as exc:  # the store is full, locked, down: ride it out
                self._abort.wait(self._trouble.report(exc, len(self._unrecorded)))
            if self._stop.is_set() and self.state == "Stopping" and not (
                    self._runs or self._unrecorded):
                return
            self._wait(time.time())

    def _tick(self, now):
        """One turn of the loop; True if it got through to the store."""
        if self._stop.is_set() and self.state == "Running":
            self._begin_stopping(now)
        sweep = self._heart.tick(now)
        if sweep and self._heart.reaped:
            self._gate.touch()  # our own commit put work back: look again
        if not self._stop.is_set() and self._scheduler.tick(now):
            self._gate.touch()
        for pool in self._pools.values():
            pool.tick(now)
        self._look_at_runs(now)
        return self._exchange(now, sweep) or sweep

    def _exchange(self, now, sweep):
        """Record finished runs and claim new tasks in one transaction, then start them."""
        self._unrecorded += [_settle(*item, self._rng) for item in self._collect()]
        progress = self._progress(now)
        wants = {} if self._stop.is_set() else self._gate.wants(self._pools, self.manager._store,
                                                                now, sweep)
        if not (self._unrecorded or progress or wants):
            return False
        done = self.manager._store.exchange(self.id, self._unrecorded, progress, wants,
                                            self._limits, now)
        self._unrecorded = []  # outcomes stay until a commit holds them: nothing is lost
        self._gate.update(wants, done, now)
        if self._limits and done.recorded or any(o.retry_at is not None for o in done.recorded):
            # Our own commit, which the store's news does not show: a retry we wrote
            # may fall due before anything else, a limited task may fit now.
            self._gate.touch()
        _log_outcomes(done)
        for claimed in done.claimed.values():
            for doc, lease, cancel in claimed:
                self._dispatch(doc, lease, cancel)
        return True

    def _wait(self, now):
        """Sleep until the store changes, a run ends, or something falls due."""
        wake = [self._heart.next_beat]
        wake += [pool.wake_at() or math.inf for pool in self._pools.values()]
        if self._runs:
            wake += [self._next_look, self._next_progress]
        if not self._stop.is_set():
            wake += [self._gate.wake_at(self._pools), self._scheduler.wake_at()]
        self._inbox.wait(max(0.0, min(wake) - now))
        if self._inbox.pending() and self._gate.backlog():
            # A backlog: give the other running tasks a moment to finish too,
            # so that one commit records them all.
            self._inbox.settle(len(self._runs), time.time() + GROUP_COMMIT_WINDOW)

    def _collect(self):
        """Ended runs from the pools: (run, reply, ended)."""
        ended = []
        for item in self._inbox.drain():
            if item is not None:
                run = self._runs.pop(item[0], None)
                if run is not None:
                    ended.append((run, item[1], item[2]))
        return ended

    def _dispatch(self, doc, lease, cancel=False):
        """Hand a claimed task to its pool; any problem fails that task only. A
        retry of a task cancelled while its last attempt ran never starts."""
        running = self._runs.get(doc["id"])
        if running is not None:
            # Taken from us as if we were dead, then claimed by us again while we
            # still run it: the run goes on, and its result counts under the new lease.
            running.lease, running.doc = lease, doc
            return
        task = self.manager._tasks.get(doc.get("task_name"))
        run = _Run(doc, lease, task, time.time())
        self._runs[run.id] = run
        problem = _job_problem(doc, task, self.target)
        if problem is not None:
            self._inbox.put((run.id, _failed(problem), time.time()))
            return
        if cancel:
            doc["attempts"] = max(0, _as_int(doc.get("attempts")) - 1)  # it never ran
            self._inbox.put((run.id, _cancelled_reply(), time.time()))
            return
        if logger.isEnabledFor(logging.INFO):
            _event(logging.INFO, "Task %s started: %s", run.id[:8], _call_repr(doc))
        self._pools[run.mode].submit(run)

    def _look_at_runs(self, now):
        """Now and then: stop the runs someone cancelled."""
        if not self._runs or now < self._next_look:
            return
        self._next_look = now + CANCEL_CHECK_INTERVAL
        for task_id in self.manager._store.cancel_requests(self.id):
            run = self._runs.get(task_id)
            if run is not None and not run.ctx.cancelled:
                logger.info("Task %s: cancel requested, stopping it", task_id[:8])
                self._pools[run.mode].cancel(run)

    def _progress(self, now):
        """Progress reports that changed since the last write: {id: report}."""
        if not self._runs or now < self._next_progress:
            return {}
        self._next_progress = now + PROGRESS_INTERVAL
        reports = {run.id: run.ctx._take_progress() for run in list(self._runs.values())}
        return {task_id: report for task_id, report in reports.items() if report is not None}

    def _release_unconfirmed(self):
        """After store trouble: a claim whose commit we could not confirm may
        have gone through. Its tasks, running here in name only, go back."""
        keep = set(self._runs) | {outcome.doc["id"] for outcome in self._unrecorded}
        for doc in self.manager._store.release(self.id, time.time(), _lost, keep=keep):
            logger.warning("Task %s: claimed by a commit that could not be confirmed; "
                           "back to pending", doc["id"][:8])

    def _fail(self, message):
        """The store went away: stop at once, say why, exit non-zero."""
        logger.error("%s; stopping", message)
        self._failure = message
        self._abort.set()

    # Start and stop -----------------------------------------------------------

    def _start(self, config, now):
        store, tasks = self.manager._store, self.manager._tasks.values()
        self._inbox.watch = store.watch()
        self._pools = _start_pools(self, config, {t.mode for t in tasks})
        self._limits = {t.name: t.concurrency for t in tasks if t.concurrency is not None}
        info = {"version": __version__, "target": self.target,
                "pools": {mode: pool.size for mode, pool in self._pools.items()
                          if not pool.sweep_only}}
        self._heart = _Heart(self.id, store, info)
        self._scheduler = _Scheduler(store, [t for t in tasks if t.periodic])
        if not self._register():
            self._heart = None  # nothing of ours in the store to give back
            return False
        return True

    def _register(self):
        """Register, riding out a store that cannot be used yet (a server still
        starting next to the worker) as the loop does; False if told to stop."""
        while True:
            try:
                self._heart.register(time.time())
                self._trouble.clear(0)
                return True
            except _StoreGone:
                raise
            except StoreError as exc:
                until = time.monotonic() + self._trouble.report(exc, 0)
                while time.monotonic() < until:
                    if self._stop.wait(0.1) or self._abort.is_set():
                        return False

    def _begin_stopping(self, now):
        """Stop claiming; daemon tasks are terminated, critical ones awaited.
        Tasks claimed ahead that have not started are given back instead:
        another worker can run them now."""
        self.state = "Stopping"
        for pool in self._pools.values():
            runs = [run for run in self._runs.values() if run.mode == pool.mode]
            waiting = pool._withdraw([run for run in runs if not run.daemon])
            waiting += pool.stop_daemons([run for run in runs if run.daemon])
            for run in waiting:  # never started: back to pending when the worker leaves
                del self._runs[run.id]
        logger.info("Shutting down: waiting for %d running task(s); Ctrl+C again to exit now",
                    sum(1 for run in self._runs.values() if not run.daemon))

    def _shutdown(self, forced):
        """Leave nothing behind: children killed, outcomes kept, the rest given back."""
        for pool in self._pools.values():
            pool.close(kill=forced)
        if self._heart is not None and self._failure is None:
            self._give_back()
        self._inbox.close()
        logger.info("Worker %s stopped", self.id)

    def _give_back(self):
        store = self.manager._store
        try:
            self._unrecorded += [_settle(*item, self._rng) for item in self._collect()]
            if self._unrecorded:
                _log_outcomes(store.exchange(self.id, self._unrecorded, {}, {}, {}, time.time()))
                self._unrecorded = []
            released = store.release(self.id, time.time(), _lost)
            if released:
                logger.warning("Exiting now: %d running task(s) back to pending", len(released))
            store.deregister(self.id)
        except Exception:  # even then: close up, other workers will take over
            logger.exception("could not give back running tasks; other workers will")


def _install_signals(stop, abort, wakeup_fd):
    """SIGINT and SIGTERM stop the worker (in the main thread only): the first
    sets ``stop``, the second ``abort``. Returns a function that puts back
    what was there before."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum, frame):
        # Only flags here; the wakeup fd below has already woken the loop.
        (abort if stop.is_set() else stop).set()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_fd = signal.set_wakeup_fd(wakeup_fd)

    def restore():
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return restore


def _start_pools(worker, config, modes):
    """One pool per mode; a mode with no task here gets a _NoPool, looked at
    once a second only to fail what it finds (a task this worker lacks)."""
    inbox, manager = worker._inbox, worker.manager
    pools = {"thread": _ThreadPool(manager, worker.threads, inbox)}
    pools["process"] = (_ProcessPool(config, worker.processes, inbox)
                        if config is not None else _NoPool("process", inbox))
    pools["async"] = (_AsyncPool(manager, worker.async_tasks, inbox)
                      if "async" in modes else _NoPool("async", inbox))
    for pool in pools.values():
        pool.start()
    return pools


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


def _outcome_note(run, reply, ended, retry_at):
    """The log line of an outcome, written once the store holds it."""
    short = run.id[:8]
    if reply["ok"]:
        return logging.INFO, "Task %s finished successfully in %.2fs", (
            short, max(0.0, ended - run.started))
    if retry_at is not None:
        return logging.WARNING, "Task %s failed (attempt %d of %d), retrying at %s: %s", (
            short, run.doc["attempts"], run.task.retries + 1, run.doc["retry_at"],
            _short_error(reply["error"]))
    if reply.get("cancelled"):
        return logging.INFO, "Task %s cancelled", (short,)
    return logging.ERROR, "Task %s failed: %s", (short, _short_error(reply["error"]))


def _event(level, message, *args):
    """Log a task event. Thousands come a second, two a task, so the record is
    made without looking for the caller's frame, which costs more than the
    line; the logging module's own settings stay as the user has them."""
    if not logger.isEnabledFor(level):
        return
    if logging.getLogRecordFactory() is logging.LogRecord:
        logger.handle(_event_record(level, message, args))
    else:  # the user's own factory makes every record
        logger.handle(logger.makeRecord(logger.name, level, __file__, 0, message, args, None,
                                        "Worker"))


def _event_record(level, message, args):
    """The LogRecord that Logger.makeRecord would make, in half the time:
    what cannot change in this process (file names, process name, the asyncio
    task: none, in the worker's own thread) is copied from one made the usual way."""
    fixed, start = _event_fields(os.getpid())
    fields, now = fixed.copy(), time.time()
    fields["msg"], fields["args"], fields["levelno"] = message, args, level
    fields["levelname"] = logging.getLevelName(level)
    fields["created"], fields["msecs"] = now, int((now - int(now)) * 1000) + 0.0
    fields["relativeCreated"] = (now - start) * 1000
    if logging.logThreads:
        fields["thread"], fields["threadName"] = (threading.get_ident(),
                                                  threading.current_thread().name)
    record = logging.LogRecord.__new__(logging.LogRecord)
    record.__dict__ = fields
    return record


@functools.lru_cache(maxsize=1)
def _event_fields(pid):
    """A record's fixed fields in process ``pid``, and when logging started."""
    model = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "", (), None, "Worker")
    return dict(model.__dict__), model.created - model.relativeCreated / 1000


def _log_outcomes(done):
    for outcome in done.recorded:
        if outcome.note is not None:
            _event(outcome.note[0], outcome.note[1], *outcome.note[2])
    for outcome in done.refused:
        logger.warning("Task %s: its lease was lost (the task went to another worker); "
                       "this result is discarded", outcome.doc["id"][:8])


def _short_error(err):
    return f"{err.get('qualname')}: {err.get('message')}"


def _call_repr(doc):
    parts = [repr(a) for a in doc["args"]] + [f"{k}={v!r}" for k, v in doc["kwargs"].items()]
    text = f"{doc['task_name']}({', '.join(parts)})"
    return text if len(text) <= 120 else text[:117] + "..."


# Worker: decisions ############################################################
#
# Plain functions of the time they are given: the tests call them with any
# clock they like.


def _settle(run, reply, ended, rng):
    """What becomes of a run: an _Outcome for the store, with its log line."""
    doc = run.doc
    if run.ctx.cancelled and not reply["ok"] and not reply.get("cancelled"):
        # Asked to stop, it failed: that is where it ends, not in a retry.
        reply = dict(reply, cancelled=True)
    retry_at = _retry_at(run.task, _as_int(doc.get("attempts")) or 1, reply, ended, rng)
    if retry_at is not None:
        doc.update(status="pending", worker=None, error=reply["error"]["traceback"],
                   exception=reply["error"], started_at=None, retry_at=_iso(retry_at))
    else:
        _finish_doc(doc, reply, ended)
    if run.ctx._progress is not None:
        doc["progress"] = run.ctx._progress
    try:
        raw = _dumps(doc)
    except Exception as exc:  # one bad outcome must not block the others
        logger.exception("Task %s: could not record its outcome", run.id[:8])
        doc = _corrupt_doc(run.id, "an outcome castor could not record")
        _finish_doc(doc, _failed(f"castor could not record this task's outcome: {exc!r}"),
                    ended)
        raw, retry_at = _dumps(doc), None
    return _Outcome(doc, raw, retry_at, run.lease, _outcome_note(run, reply, ended, retry_at))


def _retry_at(task, attempts, reply, ended, rng):
    """When the next attempt runs, or None when this one was the last."""
    if reply["ok"] or reply.get("cancelled") or task is None or attempts > task.retries:
        return None
    base = task.retry_delay * 2 ** (attempts - 1)
    return ended + min(base * rng.uniform(1.0, 1.25), MAX_SECONDS)  # jitter: no stampede


def _lost(doc, losses, cancelled, now):
    """A task whose worker died or is leaving: pending again (the lost run
    does not use up an attempt), failed after MAX_LOSSES, or cancelled."""
    doc.update(losses=losses, worker=None, started_at=None,
               attempts=max(0, _as_int(doc.get("attempts")) - 1))
    if cancelled:
        _finish_doc(doc, {"ok": False, "cancelled": True, "error": _verdict(
            "cancelled while its worker was gone", "Cancelled")}, now)
    elif losses >= MAX_LOSSES:
        doc["attempts"] += 1
        _finish_doc(doc, _failed(f"worker lost {losses} times while running this task; "
                                 "giving up"), now)
    else:
        doc["status"] = "pending"
    return doc


def _redriven(doc, now):
    """A failed or cancelled task made pending again; its past stays in history."""
    past = {key: doc.get(key) for key in ("status", "attempts", "error", "started_at",
                                          "finished_at")}
    history = doc.get("history") if isinstance(doc.get("history"), list) else []
    doc.update(status="pending", attempts=0, losses=0, started_at=None, finished_at=None,
               result=None, error=None, exception=None, eta=None, retry_at=None,
               worker=None, progress=None, history=history + [past],
               requeued_at=_iso(now))
    return doc


def _next_slot(task, last, now):
    """(fire now?, next run) of a periodic task whose stored next run is ``last``.

    Slots missed while no worker ran are run once, not replayed one by one. A
    stored slot further ahead than the task's schedule can put one is an
    older schedule's (``every=3600`` made ``every=60``): the new one starts now.
    So is a stored slot that is not a time of a cron task's expression (it was
    ``every=``, or another expression): only the expression's own times count.
    """
    if task.cron is not None and last is not None and task.cron.next_after(last - 1) != last:
        return task.cron.next_after(last) <= now, task.cron.next_after(now)
    if last is not None and last > now:
        if task.every is not None:
            if last <= now + task.every + SCHEDULE_SKEW:
                return False, last
            return False, now + task.every
        if last <= task.cron.next_after(now + SCHEDULE_SKEW):
            return False, last
        return False, task.cron.next_after(now)
    if task.every is not None:
        if last is not None and last + task.every > now:
            return True, last + task.every  # on time: keep the rhythm
        return True, now + task.every
    # A cron task waits for its first slot; a missed slot fires once.
    return last is not None, task.cron.next_after(now)


def _dead_workers(rows, me, observed, beats, now):
    """Workers that are surely dead: {id: heartbeat seen}.

    Dead means: its process is gone (same machine), or its heartbeat has not
    moved while this worker beat LEASE_TIMEOUT seconds' worth. Time alone is
    not enough: when someone holds the file locked, nobody can beat, and the
    first through must not bury the others. ``observed`` {id: (beat, our
    beats then)} is kept up to date here.
    """
    dead = {}
    for row in rows:
        wid, beat = row["id"], row["beat"]
        if wid == me:
            continue
        seen, then = observed.get(wid, (None, None))
        if beat != seen:
            observed[wid] = (beat, beats)
            then = beats
        silent = beats - then >= LEASE_TIMEOUT / HEARTBEAT_INTERVAL
        if not _alive(row["pid"], row["host"]) or (silent and row["age"] > LEASE_TIMEOUT):
            dead[wid] = beat
    for wid in set(observed) - {row["id"] for row in rows}:
        del observed[wid]
    return dead


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


# Worker: collaborators ########################################################


class _Heart:
    """Heartbeats, a look at the store's health, and the reaping of dead
    workers' tasks, each on its own schedule."""

    def __init__(self, worker_id, store, info):
        self.id, self.store, self.info = worker_id, store, info
        self.next_beat = self.next_reap = 0.0
        self.beats, self.observed, self.reaped = 0, {}, False

    def register(self, now):
        self.store.register(self.id, self.info, now)
        self.next_beat = now + HEARTBEAT_INTERVAL

    def tick(self, now):
        """Beat if due; True if it did (a sweep: once a second)."""
        self.reaped = False
        if now < self.next_beat:
            return False
        self.next_beat = now + HEARTBEAT_INTERVAL
        self.store.check()
        if self.store.heartbeat(self.id, now):
            self.beats += 1
        else:
            logger.warning("Worker %s was taken for dead; registering again", self.id)
            self.store.register(self.id, self.info, now)
        if now >= self.next_reap:
            self.next_reap = now + REAP_INTERVAL
            self.reaped = self._reap(now)
        return True

    def _reap(self, now):
        dead = _dead_workers(self.store.workers(), self.id, self.observed, self.beats, now)
        docs = self.store.reap(dead, now, _lost)
        for doc in docs:
            logger.warning("Task %s: its worker died; %s", doc["id"][:8], {
                "failed": "giving up", "cancelled": "it was cancelled"}.get(
                    doc["status"], "back to pending"))
        return bool(docs)


class _Scheduler:
    """Enqueues periodic and cron tasks: each slot is one transaction that
    exactly one worker wins, however many run."""

    def __init__(self, store, tasks):
        self.store, self.tasks, self.due = store, tasks, {}

    def tick(self, now):
        """Enqueue what is due; True if this worker enqueued something."""
        if not any(self.due.get(task.name, 0) <= now for task in self.tasks):
            return False
        stored, fired = self.store.periodic(), False
        for task in self.tasks:
            if self.due.get(task.name, 0) > now:
                continue
            last = stored.get(task.name)
            fire, next_run = _next_slot(task, last, now)
            if not fire and next_run == last:  # the stored slot stands
                self.due[task.name] = next_run
                continue
            new = task._new((), {}, now, now, task.priority) if fire else None
            won = self.store.fire_periodic(task.name, last, next_run, new)  # one worker wins
            if won and fire:
                logger.info("Periodic task %s enqueued as %s", task.name, new.doc["id"][:8])
                fired = True
            elif won and last is not None:
                logger.info("Periodic task %s: its schedule changed; next run at %s",
                            task.name, _iso(next_run))
            self.due.pop(task.name, None)  # read the stored slot again next time
        return fired

    def wake_at(self):
        return min(self.due.values(), default=math.inf) if self.tasks else math.inf


class _ClaimGate:
    """Which modes are worth a claim now.

    A mode whose last claim came back full is claimed again at once; another
    only when the store changed or a scheduled task fell due. A mode with no
    pool here (_NoPool) is looked at only on a sweep, once a second.
    """

    def __init__(self):
        self.more, self.seen, self.next_eta = {}, {}, {}

    def wants(self, pools, store, now, sweep):
        """{mode: (free slots, idle slots)} to claim for."""
        version, wants = None, {}
        for mode, pool in pools.items():
            free = pool.free()
            if free <= 0 or (pool.sweep_only and not sweep):
                continue
            if not self.more.get(mode):
                eta = self.next_eta.get(mode)
                version = store.news() if version is None else version
                if version is not None and self.seen.get(mode) == version and (
                        eta is None or eta > now) and not sweep:
                    continue
                self.seen[mode] = version
            wants[mode] = (free, pool.idle_slots())
        return wants

    def update(self, wants, done, now):
        for mode, (n, _) in wants.items():
            self.more[mode] = len(done.claimed.get(mode, ())) == n
            if mode in done.idle:
                eta = done.idle[mode]
                # Due yet not taken (a concurrency limit): wait for news, not for
                # a time already past, or the loop would spin.
                self.next_eta[mode] = None if eta is not None and eta <= now else eta

    def touch(self):
        """Something changed that the store's version does not show (our own commit)."""
        self.seen.clear()

    def backlog(self):
        return any(self.more.values())

    def wake_at(self, pools):
        etas = [self.next_eta.get(mode) for mode, pool in pools.items()
                if not pool.sweep_only and pool.free() > 0]
        return min((eta for eta in etas if eta is not None), default=math.inf)


class _Trouble:
    """Store errors the worker rides out: one log line when trouble starts
    or changes and one when it ends, and a growing pause between tries."""

    def __init__(self):
        self.message, self.pause = None, STORE_BACKOFF[0]

    def report(self, exc, kept):
        """Log ``exc`` if it is news; the seconds to wait before trying again."""
        message = str(exc) if isinstance(exc, StoreError) else repr(exc)
        if message != self.message:
            if isinstance(exc, StoreError):
                logger.error("Store error: %s; keeping %d result(s), retrying until it "
                             "works again", message, kept)
            else:
                logger.exception("worker loop error (will retry)")
            self.message = message
        pause, self.pause = self.pause, min(self.pause * 2, STORE_BACKOFF[1])
        return pause

    def clear(self, kept):
        """The store works again: True if there had been trouble."""
        if self.message is None:
            return False
        logger.warning("Store usable again; %d result(s) waiting are being recorded", kept)
        self.message, self.pause = None, STORE_BACKOFF[0]
        return True


# Worker: waking up ############################################################
#
# An idle worker must start a new task within milliseconds yet cost almost no
# CPU. It sleeps in select() on a pipe that the pools (and, through
# set_wakeup_fd, signals) write to when there is news, and on the store's
# watch: for the beaver file an inotify watch on its directory, which fires
# when any process commits (a commit writes the WAL); for PostgreSQL the
# socket of a connection that LISTENs. With no watch the worker polls every
# IDLE_POLL seconds instead.


class _Inbox:
    """Ended runs, plus a way to sleep until there is news."""

    def __init__(self):
        self._items = collections.deque()
        self._sleeping = False  # only a sleeping loop needs a byte in the pipe
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self.watch = None  # the store's: fileno() and drain()

    @property
    def wakeup_fd(self):
        return self._write

    def put(self, item):
        self._items.append(item)  # deque.append is thread-safe
        if self._sleeping:  # see _sleep: one of the two always sees the other
            with contextlib.suppress(BlockingIOError, OSError):
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
        if self.watch is None:
            self._sleep([self._read], min(timeout, IDLE_POLL))
        else:
            self._sleep([self._read, self.watch], timeout)

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
        for source in ready:
            if source is self._read:
                _drain(self._read)
            else:
                source.drain()
        return bool(ready)

    def close(self):
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.watch is not None:
            self.watch.close()


def _drain(fd):
    """Read a non-blocking fd empty: its bytes only said "wake up"."""
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 65536):
            pass


class _InotifyWatch:
    """Readable when files in a directory are written (Linux inotify)."""

    def __init__(self, fd):
        self.fd = fd

    @classmethod
    def open(cls, directory):
        """A watch on ``directory``, or None where inotify is not available."""
        import ctypes
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        in_modify, in_create, in_moved_to = 0x2, 0x100, 0x80
        mask = in_modify | in_create | in_moved_to
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            os.close(fd)
            return None
        return cls(fd)

    def fileno(self):
        return self.fd

    def drain(self):
        _drain(self.fd)

    def close(self):
        with contextlib.suppress(OSError):
            os.close(self.fd)


# Worker: pools ################################################################
#
# One pool class per execution mode. A pool owns everything about its mode:
# starting, running, timeouts, cancelling, daemon tasks at shutdown. Every run
# it is given ends as exactly one (task_id, reply, ended) in the inbox, in the
# reply shape of "Running a task"; after close(kill=True) runs end silently,
# and the worker gives them back to pending.


class _Pool:
    """An execution mode's pool of slots."""

    mode = None
    #: A pool that only fails what it is given (_NoPool): claimed for once a second.
    sweep_only = False

    def __init__(self, size, inbox):
        self.size, self.inbox = size, inbox

    def start(self):
        """Start threads, processes or a loop."""

    def busy(self):
        """Slots in use (a thread still stuck in an abandoned run counts)."""
        raise NotImplementedError

    def free(self):
        """How many more tasks to claim for this pool."""
        return self.size - self.busy()

    def idle_slots(self):
        """Slots that would start a task the moment it arrives."""
        return max(0, self.free())

    def submit(self, run):
        raise NotImplementedError

    #: How a daemon=True run ends when the worker stops.
    shutdown_message = "terminated at shutdown"

    def cancel(self, run):
        """Stop a run someone cancelled; it ends as cancelled."""
        run.ctx._cancel = True
        self._end_early(run, _cancelled_reply())

    def stop_daemons(self, runs):
        """At shutdown: end these daemon=True runs now. Those that have not
        started are given back untouched instead (returned: the worker puts
        them back to pending): terminating a task that never ran loses it."""
        waiting = self._withdraw(runs)
        for run in runs:
            if run not in waiting:
                self._end_early(run, _failed(self.shutdown_message))
        return waiting

    def _withdraw(self, runs):
        """Take back those of ``runs`` not started yet, so they never start."""
        return []

    def _end_early(self, run, reply):
        """End a run before it finished by itself, with ``reply``."""
        raise NotImplementedError

    def tick(self, now):
        """End the runs past a deadline the mode cannot enforce by itself."""

    def wake_at(self):
        """When the pool needs tick() next (a deadline it watches), or None."""
        return None

    def close(self, kill):
        """Let go of everything; ``kill``: a forced exit, runs end silently."""

    def post(self, run, reply):
        self.inbox.put((run.id, reply, time.time()))


def _cancelled_reply():
    return {"ok": False, "cancelled": True,
            "error": _verdict("cancelled while running", "Cancelled")}


class _NoPool(_Pool):
    """A mode this worker has no task of: what is claimed fails, clearly."""

    sweep_only = True

    def __init__(self, mode, inbox):
        super().__init__(1, inbox)
        self.mode = mode

    def busy(self):
        return 0

    def submit(self, run):
        self.post(run, _failed(f"{run.doc.get('task_name')} is a {self.mode} task but this "
                               f"worker has no {self.mode} tasks registered"))

    def _end_early(self, run, reply):
        pass  # its runs end as soon as they are submitted


class _ThreadPool(_Pool):
    """Daemon threads, so a forced exit never waits on a hung task.

    Python cannot kill a thread: a run past its timeout, or a daemon run at
    shutdown, is ended at once and its thread abandoned (still counted busy)
    until the function returns; its late result is dropped. A cancel only
    raises the task's ``cancelled`` flag (cooperative). Each thread has
    tasks claimed ahead (_Window: fewer transactions while a backlog drains);
    a timeout counts from a task's own start.
    """

    mode = "thread"

    def __init__(self, manager, size, inbox):
        super().__init__(size, inbox)
        self.limit = manager.max_payload
        self.window = _Window(manager._store.claim_ahead)
        self.jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._runs = {}  # id -> [run, started?], until its reply is posted
        self._started = self._abandoned = 0

    def start(self):
        for n in range(self.size):
            threading.Thread(target=self._serve, name=f"castor-thread-{n}", daemon=True).start()

    def busy(self):
        return self._started + self._abandoned

    def free(self):
        # A thread abandoned to a hung task takes its whole window with it.
        return max(0, self.size - self._abandoned) * self.window.size() - len(self._runs)

    def idle_slots(self):
        return max(0, self.size - len(self._runs) - self._abandoned)

    def _entry(self, run):
        """[run, started?] of this very run, or None. A task timed out and
        retried is another run under the same id while its first thread runs on."""
        entry = self._runs.get(run.id)
        return entry if entry is not None and entry[0] is run else None

    def _withdraw(self, runs):
        waiting = []
        with self._lock:
            for run in runs:
                entry = self._entry(run)
                if entry is not None and not entry[1]:
                    del self._runs[run.id]  # its thread will find it gone and skip it
                    waiting.append(run)
        return waiting

    def close(self, kill):
        for _ in range(self.size):  # the threads between tasks exit; stuck ones are daemons
            self.jobs.put(None)

    def submit(self, run):
        with self._lock:
            self._runs[run.id] = [run, False]
        self.jobs.put(run)

    def cancel(self, run):
        run.ctx._cancel = True  # cooperative, unless it has not started yet
        with self._lock:
            entry = self._entry(run)
            queued = entry is not None and not entry[1]
        if queued:
            self._end(run, _cancelled_reply())

    def _end_early(self, run, reply):
        self._end(run, reply)

    def wake_at(self):
        deadlines = [run.deadline for run, started in list(self._runs.values())
                     if started and run.deadline]
        return min(deadlines, default=None)

    def tick(self, now):
        """End the runs past their timeout."""
        for run, started in list(self._runs.values()):
            if started and run.deadline is not None and now >= run.deadline:
                self._end(run, _failure(TimeoutError(
                    f"task exceeded its timeout of {run.task.timeout:g}s (its thread cannot "
                    "be killed; its late result will be discarded)")))

    def _serve(self):
        while True:
            run = self.jobs.get()
            if run is None:
                return
            with self._lock:
                entry = self._entry(run)
                if entry is None:
                    continue  # ended before it started
                entry[1] = True
                self._started += 1
                run.begin(time.time())
            began = time.perf_counter()
            try:
                reply = _execute(run.task, run.doc["args"], run.doc["kwargs"], run.ctx,
                                 self.limit)
            except BaseException as exc:  # every run must end, whatever happens
                reply = _failed(f"the task crashed castor: {exc!r}")
            self._end(run, reply, took=time.perf_counter() - began)

    def _end(self, run, reply, took=None):
        """Post a run's reply once: the first of its thread and castor wins.
        ``took``: the seconds its thread ran it (the reply is the thread's)."""
        by_thread = took is not None
        with self._lock:
            if by_thread:
                self.window.record(took)
            entry = self._entry(run)
            if entry is None:  # its reply went out already: a late result is dropped
                if by_thread:
                    self._abandoned -= 1
                return
            del self._runs[run.id]
            self._started -= entry[1]
            if entry[1] and not by_thread:  # its thread runs on, abandoned
                self._abandoned += 1
        self.post(run, reply)


#: While a thread pool's tasks are short, each thread has more tasks claimed
#: ahead than the store's claim_ahead: as many as it runs in about
#: CLAIM_AHEAD_SECONDS, up to CLAIM_AHEAD_MOST. A drain of tiny tasks then
#: takes far fewer transactions, and a slow task keeps few waiting behind it.
CLAIM_AHEAD_SECONDS = 0.05
CLAIM_AHEAD_MOST = 64


class _Window:
    """Tasks to have claimed per thread, from how long recent runs took."""

    def __init__(self, least):
        self.least, self.mean = least, None

    def record(self, seconds):
        self.mean = seconds if self.mean is None else self.mean + (seconds - self.mean) / 8

    def size(self):
        if self.mean is None:
            return self.least
        fits = CLAIM_AHEAD_SECONDS / self.mean if self.mean > 0 else CLAIM_AHEAD_MOST
        return max(self.least, min(CLAIM_AHEAD_MOST, int(fits)))


class _AsyncPool(_Pool):
    """One event loop in a thread of its own, ``size`` coroutines at once.

    Heartbeats and claims never run on it, so a coroutine that blocks the
    loop stalls only the other coroutines; a watchdog says which one.
    """

    mode = "async"
    shutdown_message = "cancelled at shutdown"

    def __init__(self, manager, size, inbox):
        super().__init__(size, inbox)
        self.limit = manager.max_payload
        self._runs, self._tasks, self._endings = {}, {}, {}
        self._loop = self._thread = None
        self._beat = time.monotonic()
        self._closed = threading.Event()
        self._silent = False  # a forced exit: cancelled runs go back to pending

    def start(self):
        import asyncio
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="castor-async", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch_loop, name="castor-async-watch", daemon=True).start()

    def busy(self):
        return len(self._runs)

    def submit(self, run):
        self._runs[run.id] = run
        self._loop.call_soon_threadsafe(self._begin, run)

    def close(self, kill):
        self._silent = kill
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop_loop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()
        self._closed.set()

    # On the loop ----------------------------------------------------------------

    def _run_loop(self):
        self._loop.call_soon(self._tick)
        while True:
            try:
                self._loop.run_forever()
                return  # stopped by close()
            except BaseException as exc:  # SystemExit, KeyboardInterrupt: see below
                # A run's own coroutine cannot raise these out of the loop (it
                # ends failed); an asyncio task it started in the background can.
                # Without the loop every async run would stay running for good.
                logger.error("An async task's background work raised %s out of the event "
                             "loop; the loop goes on", f"{type(exc).__name__}({exc})")

    def _tick(self):
        self._beat = time.monotonic()
        self._loop.call_later(0.1, self._tick)

    def _begin(self, run):
        run.begin(time.time())
        coro = _execute_async(run.task, run.doc["args"], run.doc["kwargs"], run.ctx, self.limit)
        task = self._loop.create_task(coro, name=f"{run.doc['task_name']} (task {run.id[:8]})")
        self._tasks[run.id] = task
        # A done-callback runs however the task ends, even cancelled before it began.
        task.add_done_callback(lambda done: self._ended(run, done))

    def _ended(self, run, task):
        """Post the run's reply: its own, or how castor ended it."""
        ending = self._endings.pop(run.id, None)
        self._tasks.pop(run.id, None)
        self._runs.pop(run.id, None)
        if self._silent:
            return  # a forced exit: the worker gives the task back
        if task.cancelled():  # by castor (an ending), or by the task's own code
            reply = ending or _failed("the task's coroutine was cancelled by its own code")
        elif task.exception() is not None:  # SystemExit, KeyboardInterrupt from a coroutine
            reply = _failure(task.exception())
        else:
            reply = task.result()
        if not task.cancelled() and run.deadline is not None and time.time() > run.deadline:
            # It blocked the loop past its deadline, where no cancel could reach it.
            reply = _failure(TimeoutError(
                f"task exceeded its timeout of {run.task.timeout:g}s (it blocked the event "
                "loop, so it could not be cancelled in time)"))
        self.post(run, reply)

    def _cancel_task(self, task_id):
        task = self._tasks.get(task_id)
        if task is not None:
            task.cancel()

    async def _drain(self):
        import asyncio
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=2)
        self._loop.stop()

    def _stop_loop(self):
        if self._tasks:
            self._loop.create_task(self._drain())
        else:
            self._loop.stop()

    # Elsewhere ------------------------------------------------------------------

    def _end_early(self, run, reply):
        self._endings[run.id] = reply
        self._loop.call_soon_threadsafe(self._cancel_task, run.id)

    def _watch_loop(self):
        """Warn when a coroutine blocks the loop, naming it."""
        import asyncio
        warned = False
        while not self._closed.wait(LOOP_BLOCKED_AFTER / 4):
            stalled = time.monotonic() - self._beat
            if stalled < LOOP_BLOCKED_AFTER:
                warned = False
            elif not warned and self._loop.is_running():
                task = asyncio.current_task(self._loop)
                logger.warning("The async event loop has been blocked for %.1fs by %s: an "
                               "async task is running blocking code (await it, or use "
                               "mode='thread')", stalled,
                               task.get_name() if task is not None else "a callback")
                warned = True


# Worker: process pool #########################################################
#
# Each slot owns one child process, started with subprocess (fork+exec, never
# a bare fork of this threaded process) in a session of its own, so a terminal's
# Ctrl+C reaches only the worker, which decides what happens to the children.
# A child imports the same modules the worker did and finds tasks by name in
# its own registry. It never opens the store: it reads jobs as JSON lines on
# stdin, runs them one after the other, and writes progress and replies as
# JSON lines on its original stdout (the task's own prints go to stderr).
#
# A slot keeps up to PROCESS_WINDOW jobs in its child's pipe, so the child
# starts the next one the moment it replies (no round trip per task), but
# only while no other child is up and idle: work waits behind a busy child
# only when no other could start it now. A job's timeout runs from when its
# child starts it, which is when the previous reply came. When a child must
# go (a timeout, a cancel, a crash), the job it was running ends and the
# ones still waiting in its pipe go back to the pool's queue: they never
# started.
#
# While tasks are short, the pool claims further ahead than its pipes hold, as
# a thread pool does (_Window, from how long the children took): otherwise
# the children finish their windows and wait while the worker's loop commits.
# Those extra tasks wait in the pool's queue, where any idle slot takes them.

#: Jobs a process-pool child may have in its pipe at once, the running one
#: included; also the fewest the pool claims per child.
PROCESS_WINDOW = 4


class _ProcessPool(_Pool):
    mode = "process"

    def __init__(self, config, size, inbox):
        super().__init__(size, inbox)
        self.config = config
        self.window = _Window(PROCESS_WINDOW)
        self.jobs = queue.SimpleQueue()
        self.runs = {}     # id -> run, until its reply is posted
        self.endings = {}  # id -> the reply of a run castor ends early
        self.withdrawn = set()  # ids given back at shutdown before they were sent
        self.silent = False
        self.slots = [_ProcessSlot(self, n) for n in range(size)]

    def start(self):
        for slot in self.slots:
            slot.start()

    def busy(self):
        return sum(1 for slot in self.slots if slot.inflight)

    def free(self):
        # Claimed tasks wait in pipes and in self.jobs, not in the store.
        return self.size * self.window.size() - len(self.runs)

    def idle_slots(self):
        return max(0, self.size - len(self.runs))

    def ready_slots(self):
        """Slots whose child is up with nothing in flight: they could start a
        job now. A child still starting does not count, or the others would
        take one job at a time until it is up."""
        return sum(1 for slot in self.slots if slot.child is not None and not slot.inflight)

    def submit(self, run):
        self.runs[run.id] = run
        self.jobs.put(run)

    def close(self, kill):
        self.silent = kill
        for _ in self.slots:
            self.jobs.put(None)
        for slot in self.slots:
            slot.stop(kill)

    def post(self, run, reply):
        self.runs.pop(run.id, None)
        self.endings.pop(run.id, None)
        if not self.silent:
            super().post(run, reply)

    def _withdraw(self, runs):
        sent = {run.id for slot in self.slots for run in list(slot.inflight)}
        waiting = [run for run in runs if run.id in self.runs and run.id not in sent]
        for run in waiting:  # still in the queue: a slot will drop it unsent
            self.withdrawn.add(run.id)
            self.runs.pop(run.id, None)
        return waiting

    def _end_early(self, run, reply):
        if run.id not in self.runs:
            return
        # endings first, then the look at the slots: a slot starts a job,
        # then looks at endings, so one of the two sees the other.
        self.endings[run.id] = reply
        for slot in self.slots:
            if slot.running() is run:
                slot.stop_running(run)


class _ProcessSlot(threading.Thread):
    """One child, and the jobs in its pipe (the first one is running)."""

    def __init__(self, pool, n):
        super().__init__(name=f"castor-process-{n}", daemon=True)
        self.pool = pool
        self.child = None
        self.inflight = collections.deque()
        self.buffer = b""  # what the child wrote that is not a whole line yet
        self.started = None  # when the child began the first job in flight
        self.killed_for = None  # the job another thread killed the child to stop
        self.spawning = None  # a child still importing the app
        self.closing = self.draining = False
        self._lock = threading.Lock()

    def running(self):
        inflight = self.inflight
        return inflight[0] if inflight else None

    def run(self):
        while not (self.draining and not self.inflight):
            if self.child is None:  # warm up (again) before the next task: a child takes a while
                with contextlib.suppress(Exception):
                    self._ensure_child()
            self._fill()
            if self.inflight:
                self._step()

    def _fill(self):
        """Send jobs to the child: wait for one when idle; take more only
        while no other slot is ready."""
        pool = self.pool
        while not self.draining and len(self.inflight) < PROCESS_WINDOW:
            idle = not self.inflight
            if not idle and pool.ready_slots() > 0:
                return
            try:  # never block with jobs in flight: their replies must be read
                run = pool.jobs.get(block=idle)
            except queue.Empty:
                return
            if run is None:
                self.draining = True
                return
            if run.id in pool.withdrawn:  # given back at shutdown
                pool.withdrawn.discard(run.id)
                continue
            if run.id in pool.endings:  # ended before it was sent
                pool.post(run, pool.endings[run.id])
                continue
            if idle:
                self.started = time.monotonic()
            if not self._send(run):
                return

    def _send(self, run):
        job = {"id": run.id, "name": run.task.name, "args": run.doc["args"],
               "kwargs": run.doc["kwargs"], "attempt": run.ctx.attempt}
        self.inflight.append(run)
        try:
            child = self._ensure_child()  # a child that died while idle is replaced
            child.stdin.write((_dumps(job) + "\n").encode())
            child.stdin.flush()
            return True
        except OSError:
            if len(self.inflight) == 1:  # a child that died while idle: start afresh
                self._requeue_all()
            else:
                self._lose_child(_failed("the task's process died; the pool replaced it"))
        except CastorError as exc:
            self._lose_child(_failed(f"could not start the task's process: {exc}"))
        return False

    def _step(self):
        """Wait for the running job's next line: progress, its reply, or its end."""
        run = self.inflight[0]
        timeout = run.task.timeout
        line = self._read_line(None if timeout is None else self.started + timeout)
        if line is None:
            self._lose_child(_failure(TimeoutError(
                f"task exceeded its timeout of {timeout:g}s; its process was killed")))
        elif not line:
            self._child_gone(run)
        else:
            self._on_line(run, json.loads(line))

    def _child_gone(self, run):
        if run.id not in self.pool.endings and self.killed_for is not None:
            # Killed to stop a job that had just finished: this one was not meant to die.
            self._requeue_all()
            return
        code = self.child.wait() if self.child is not None else None
        reason = "killed" if code is None else _exit_reason(code)
        self._lose_child(_failed(f"the task's process died ({reason}); the pool replaced it"))

    def _on_line(self, run, message):
        # A reply carries its job's last report; a lone report names its job.
        if "progress" in message and message.get("id", run.id) == run.id:
            run.ctx._progress, run.ctx._dirty = message["progress"], True
        if "ok" in message:
            self._finish(message)
            self.started = time.monotonic()  # the child starts the next job now
            nxt = self.running()
            if nxt is not None and nxt.id in self.pool.endings:  # cancelled while waiting
                self._lose_child(None)

    def _finish(self, reply):
        """The running job's reply (or how castor ended it) goes to the inbox."""
        run = self.inflight.popleft()
        # Two slots may record at once and lose one figure of a running mean.
        self.pool.window.record(time.monotonic() - self.started)
        self.pool.post(run, self.pool.endings.get(run.id) or reply)

    def _lose_child(self, reply):
        """The child goes: its running job ends with ``reply`` (or how castor
        ended it); the jobs still waiting in its pipe go back to the queue."""
        self.kill_child()
        if self.inflight:
            waiting = list(self.inflight)[1:]
            self.inflight = collections.deque([self.inflight[0]])
            self._finish(reply)
            for run in waiting:
                self.pool.jobs.put(run)

    def _requeue_all(self):
        """The child goes and none of its jobs ended: all of them back to the queue."""
        self.kill_child()
        waiting, self.inflight = list(self.inflight), collections.deque()
        for run in waiting:
            self.pool.jobs.put(run)

    def stop_running(self, run):
        """From another thread: kill the child that runs ``run``. The slot's own
        thread sees it die, and sorts out what was in flight."""
        self.killed_for = run.id
        child = self.child
        if child is not None:
            _kill_group(child)

    def _read_line(self, deadline):
        """A line; None past the deadline; b"" when the child died.

        The pipe is read raw, into a buffer of our own: with several jobs in
        flight several replies arrive together, and a buffered file object
        would hold them where select() cannot see them.
        """
        while b"\n" not in self.buffer:
            child = self.child
            left = None if deadline is None else deadline - time.monotonic()
            if child is None:
                return b""
            if left is not None and left <= 0:
                return None
            try:
                fd = child.stdout.fileno()
                ready, _, _ = select.select([fd], [], [], 1.0 if left is None else min(left, 1.0))
                chunk = os.read(fd, 65536) if ready else None
            except (OSError, ValueError):  # killed and closed meanwhile
                return b""
            if chunk is None and child.poll() is not None:
                # Dead, yet the pipe stays open: processes it forked hold it.
                _kill_group(child)
                return b""
            if chunk == b"":
                return b""
            if chunk:
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def _ensure_child(self):
        with self._lock:
            if self.child is not None and self.child.poll() is None:
                return self.child
            if self.closing:
                raise CastorError("the worker is shutting down")
            try:
                self.child = _spawn_child(self.pool.config, self._spawning)
            finally:
                self.spawning = None
            self.buffer, self.killed_for = b"", None
            return self.child

    def _spawning(self, child):
        self.spawning = child  # stop() can kill it while it imports, without the lock

    def kill_child(self):
        with self._lock:
            child, self.child = self.child, None
        if child is not None:
            _kill_group(child)
            child.wait()

    def stop(self, kill):
        import subprocess
        self.closing = True
        spawning = self.spawning
        if spawning is not None:  # still importing the app, with no job: it may hang
            _kill_group(spawning)
        if not kill:
            self.join(timeout=5)
        child = self.child
        if child is not None:
            with contextlib.suppress(OSError):
                child.stdin.close()  # a child between tasks exits on EOF
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=0 if kill else 2)
        self.kill_child()


def _kill_group(child):
    """SIGKILL a pool child, which leads its own session: whatever the task
    started goes too."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)


def _spawn_child(config, spawning=lambda child: None):
    """A new pool process, once it has imported the app; ``spawning(child)``
    hears of it before that."""
    import subprocess
    boot = (f"import sys; sys.path.insert(0, {_own_root()!r}); import importlib; "
            f"importlib.import_module({_own_name()!r})._child_main()")
    # Unbuffered: the slot reads the pipe itself (see _ProcessSlot._read_line).
    child = subprocess.Popen([sys.executable, "-c", boot, _dumps(config)], bufsize=0,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             start_new_session=True, env=dict(os.environ, CASTOR_POOL_CHILD="1"))
    spawning(child)
    ready, _, _ = select.select([child.stdout], [], [], CHILD_START_TIMEOUT)
    line = child.stdout.readline() if ready else b""
    hello = json.loads(line) if line else {"fatal": "no answer from the new process"}
    if "fatal" in hello:
        child.kill()
        child.wait()
        raise CastorError(hello["fatal"])
    return child


def _own_root():
    """The sys.path entry this module is imported from, by its own name."""
    root = os.path.dirname(os.path.abspath(__file__))
    for _ in range(_own_name().count(".")):
        root = os.path.dirname(root)
    return root


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
    return {"target": target, "imports": list(imports), "limit": manager.max_payload,
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
    # The pipes move off fds 0 and 1, where the tasks and whatever they start
    # would write into the replies or read jobs meant for us.
    out = _ChildOut(os.fdopen(os.dup(1), "w"))
    jobs = os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.path[:0] = [p for p in config["path"] if p not in sys.path]
    _watch_parent(os.getppid())  # before the user's code, which could hang
    try:
        manager = _load_app(config["target"], config["imports"])
    except BaseException as exc:  # report any import failure to the parent
        out.send({"fatal": f"{type(exc).__name__}: {exc}"})
        return
    out.send({"ready": True})
    for line in _read_jobs(jobs):
        out.send(_child_run(manager, line, out, config["limit"]))


def _read_jobs(stdin):
    """A pool child's job lines, read by a thread of their own as they come:
    a worker writing a job while we write a reply must never wait for us
    while we wait for it (a pipe holds only 16-64 KiB)."""
    lines = queue.SimpleQueue()

    def read():
        try:
            for line in stdin:
                lines.put(line)
        finally:
            lines.put(None)  # EOF: the worker let us go
    threading.Thread(target=read, name="castor-jobs", daemon=True).start()
    return iter(lines.get, None)


def _child_run(manager, line, out, limit):
    """Run one job line in a pool child; always a reply, whatever happens."""
    try:
        job = json.loads(line)
        task = manager._tasks.get(job["name"])
        if task is None:
            return _failed(f"unknown task {job['name']!r} in the process pool")
        ctx = TaskContext(job["id"], job["name"], job["attempt"], report=out.progress)
        reply = _execute(task, job["args"], job["kwargs"], ctx, job.get("limit", limit))
        out.drop_held()  # the reply carries the last report; a late one would mislead
        if ctx._progress is not None:
            reply["progress"] = ctx._progress
        return reply
    except BaseException as exc:
        return _failed(f"the task crashed castor: {exc!r}")


class _ChildOut:
    """A pool child's replies and progress, one JSON line each.

    Progress is coalesced: at most one line per PROGRESS_INTERVAL / 5 (the
    worker writes the store no oftener anyway), and a report held back is
    sent when that interval is over, so the latest one always arrives.
    """

    def __init__(self, stream):
        self.stream, self.lock = stream, threading.Lock()
        self.last, self.held = 0.0, None

    def send(self, message):
        with self.lock:
            self.stream.write(_dumps(message) + "\n")
            self.stream.flush()

    def progress(self, ctx):
        gap = PROGRESS_INTERVAL / 5
        with self.lock:
            wait = self.last + gap - time.monotonic()
            if wait > 0:
                if self.held is None:  # one timer for the whole interval
                    threading.Timer(wait, self._send_held).start()
                self.held = ctx
                return
            self.last = time.monotonic()
        self.send({"id": ctx.id, "progress": ctx._progress})

    def drop_held(self):
        with self.lock:
            self.held = None

    def _send_held(self):
        with self.lock:
            ctx, self.held = self.held, None
            self.last = time.monotonic()
        if ctx is not None:
            self.send({"id": ctx.id, "progress": ctx._progress})


def _watch_parent(parent):
    """Exit when the worker is gone, even in the middle of a task."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        with contextlib.suppress(OSError):  # what the task started goes too: we lead
            os.killpg(0, signal.SIGKILL)    # our own session (see _spawn_child)
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
            "busy": self.worker.busy(), "counts": counts, "problem": self.worker.problem,
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
            import termios  # POSIX only
            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd)
        except ImportError:
            return lambda: None
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
    """Whether this process group owns the terminal ``fd``; False when it is
    not our controlling terminal at all (``setsid castor -i``): then its
    settings are left alone."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False


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
        self.body = max(7, room // 2)  # the stats need seven lines
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
    if view.get("problem"):  # the log panel says what; the header says that
        state, sgr = "Store error, retrying", "1;31"
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
        [("Process Tasks: ", ""), ("%d / %d" % busy.get("process", (0, 0)), "1;32")],
        [("Thread Tasks:  ", ""), ("%d / %d" % busy.get("thread", (0, 0)), "1;32")],
        [("Async Tasks:   ", ""), ("%d / %d" % busy.get("async", (0, 0)), "1;32")],
        [("Pending Queue: ", ""), (f"{counts['pending']:,}", "1;36")],
        [("Total Done:    ", ""), (f"{counts['success']:,}", "1")],
        [("Failed:        ", ""), (f"{counts['failed']:,}", "1;31" if counts["failed"] else "1")],
        [("Rate:          ", ""), (f"{view['rate']:.1f} tasks/s", "1")],
    ]


def _task_row(doc, now, width):
    """``c4a3f2b1 SUCCESS   tasks.send_email   0.02s``, fitted to ``width``."""
    status = str(doc.get("status"))
    name_room = max(0, width - 27)  # id 8, status 9, duration 7, 3 spaces
    done = _percent(doc) if status == "running" else ""
    name = _short_name(str(doc.get("task_name")), max(0, name_room - len(done)))
    return [(str(doc.get("id"))[:8], "2"), (" ", ""),
            (status.upper().ljust(9), _STATUS_SGR.get(status, "")), (" ", ""),
            ((name + done).ljust(name_room), ""),
            (" " + _duration(doc, now).rjust(7), "")]


def _percent(doc):
    """`` 42%`` for a running task that reported progress out of a total."""
    progress = doc.get("progress")
    try:
        return f" {min(100, max(0, int(100 * progress['done'] / progress['total']))):d}%"
    except (TypeError, KeyError, ZeroDivisionError, ValueError, OverflowError):
        return ""


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
    import unicodedata
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _clean(text):
    """No control characters on the screen: a task's data could move the cursor."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else " " for c in text)


# Web view #####################################################################
#
# ``castor web main:manager``, or ``manager.wsgi_app()`` mounted in an app: a
# WSGI application on the standard library alone. Pages are built on the
# server, and every value that came from a task goes through _esc; the
# overview then polls /api/summary, which reads counts() and one page of
# tasks (never a scan), and app.js draws the rows with textContent only. The
# script and the stylesheet are served from the constants below, so the
# Content-Security-Policy allows no inline script or style at all: an
# argument like "<script>" is text, and would not run even if it got through.
#
# Actions are POST forms carrying a CSRF token: the HMAC, under a secret
# drawn when the app starts, of a random value kept in a SameSite=Strict,
# HttpOnly cookie (a signed double submit). Another site can make a browser
# send the cookie, but can neither read it nor compute the token. Each action
# answers 303 back to its page, with a flash message signed the same way, so
# a link cannot make the page say something castor did not.

#: Tasks on one page of the overview's list.
WEB_PAGE_SIZE = 50

#: Milliseconds between two polls of /api/summary by an open overview.
WEB_POLL_MS = 2000

#: The largest POST body, in bytes: the forms carry a few short fields.
WEB_MAX_FORM = 16 * 1024

#: A list offset past this is cut to it (SQLite's integers end at 2**63).
WEB_MAX_OFFSET = 10 ** 12

#: Characters of a task's arguments shown in the list, "…" after that.
WEB_ARGS_PREVIEW = 80

#: The age the prune form offers, in days.
WEB_PRUNE_DAYS = 7

#: The cookie holding the random half of the CSRF token.
_CSRF_COOKIE = "castor_csrf"

#: Only castor's own files: no inline script or style, no frames, no plugins.
_WEB_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

#: Headers of every reply.
_WEB_HEADERS = (("Content-Security-Policy", _WEB_CSP), ("X-Content-Type-Options", "nosniff"),
                ("X-Frame-Options", "DENY"), ("Referrer-Policy", "same-origin"))

#: Shown on every page when the app has no ``auth``.
_NO_AUTH_WARNING = ("No authentication: anyone who can reach this page can retry, cancel "
                    "and prune tasks.")

#: The routes: (method, path) to the _WebApp method that answers; "*" is a task id.
_WEB_ROUTES = {
    ("GET", "/"): "_overview",
    ("GET", "/task/*"): "_task_page",
    ("GET", "/api/summary"): "_summary",
    ("GET", "/static/app.js"): "_script",
    ("GET", "/static/app.css"): "_style",
    ("POST", "/task/*/retry"): "_retry_one",
    ("POST", "/task/*/cancel"): "_cancel_one",
    ("POST", "/retry-failed"): "_retry_failed",
    ("POST", "/prune"): "_prune",
}


class _WebApp:
    """The web view as a WSGI application: ``manager.wsgi_app(auth="user:password")``."""

    def __init__(self, manager, auth=None):
        if auth is not None and (not isinstance(auth, str) or ":" not in auth):
            # Not the value itself: it may well hold a password.
            raise ValueError("auth must be 'user:password' or None")
        self.manager = manager
        self.guard = _WebGuard(auth)

    def __repr__(self):
        return f"<castor web view of {self.manager.path!r}>"

    def __call__(self, environ, start_response):
        request = _Request(environ)
        try:
            response = self._handle(request)
        except Exception as exc:  # one bad request must not take the server down
            logger.exception("web view: %s %s failed", request.method, request.path)
            shown = str(exc) if isinstance(exc, CastorError) else "see the server's log"
            response = self._error(request, "500 Internal Server Error", shown)
        return response.send(start_response, request.method)

    def _handle(self, request):
        if not self.guard.authorized(request):
            return _web_unauthorized()
        key, request.task_id = _web_route(request.path)
        method = "GET" if request.method == "HEAD" else request.method
        name = _WEB_ROUTES.get((method, key))
        if name is None:
            return self._no_route(request, key)
        if method == "POST":
            request.fields = request.form()
            if request.fields is None:
                return self._error(request, "413 Content Too Large", "This form is too large.")
            if not self.guard.csrf_ok(request):
                return self._error(request, "403 Forbidden", "The form's security token is "
                                   "missing or stale: reload the page and try again.")
        return getattr(self, name)(request)

    def _no_route(self, request, key):
        allowed = [method for method, path in _WEB_ROUTES if path == key]
        if not allowed:
            return self._error(request, "404 Not Found", "There is no such page.")
        methods = ", ".join(allowed + ["HEAD"] * ("GET" in allowed))
        return self._error(request, "405 Method Not Allowed", f"This page takes {methods}.",
                           headers=[("Allow", methods)])

    # Pages -------------------------------------------------------------------

    def _overview(self, request):
        view = _web_view(request.query)
        counts = self.manager.counts()
        rows, more = self._rows(view)
        content = "".join([
            '<div class="top">', _web_counts(request, counts, view), _WEB_CHART, "</div>",
            self._filters(request, view), self._bulk_actions(request, view),
            _web_task_table(request, view, rows, more),
            _web_workers(self.manager.workers()), _web_periodic(self.manager.periodic()),
        ])
        data = {"page": "overview", "poll": WEB_POLL_MS, "status": view["status"] or "",
                "name": view["name"] or "", "offset": view["offset"]}
        return self._page(request, "Tasks", content, data=data)

    def _task_page(self, request):
        handle = self.manager.get_task_by_id(request.task_id)
        try:
            doc = None if handle is None else handle.info()
        except UnknownTaskError:  # pruned since get_task_by_id
            doc = None
        if doc is None:
            return self._error(request, "404 Not Found", f"There is no task {request.task_id!r}"
                               " (it may have been pruned).")
        content = (_web_task_head(request, doc) + self._task_actions(request, doc)
                   + _web_task_body(doc))
        return self._page(request, doc.get("task_name") or "Task", content,
                          data={"page": "task"})

    def _summary(self, request):
        """The overview's live data: counts() and one page of the list, nothing more."""
        view = _web_view(request.query)
        counts = self.manager.counts()
        rows, more = self._rows(view)
        return _web_json({"counts": counts, "tasks": rows, "more": more,
                          "offset": view["offset"], "limit": WEB_PAGE_SIZE})

    def _script(self, request):
        return _Response("200 OK", _WEB_JS, "text/javascript; charset=utf-8",
                         cache="private, max-age=86400")

    def _style(self, request):
        return _Response("200 OK", _WEB_CSS, "text/css; charset=utf-8",
                         cache="private, max-age=86400")

    def _rows(self, view):
        """One page of the list, and whether an older page exists (one more row read)."""
        docs = self.manager.tasks(view["status"], WEB_PAGE_SIZE + 1, name=view["name"],
                                  offset=view["offset"])
        now = time.time()
        return [_web_row(doc, now) for doc in docs[:WEB_PAGE_SIZE]], len(docs) > WEB_PAGE_SIZE

    def _page(self, request, title, content, status="200 OK", data=None, headers=()):
        attrs = _web_attrs({"base": _web_quote(request.base), **(data or {})})
        text = _WEB_PAGE.format(
            title=_esc(title), css=request.href("/static/app.css", v=__version__),
            js=request.href("/static/app.js", v=__version__), home=request.href("/"),
            store=_esc(self.manager.path), attrs=attrs, notices=self._notices(request),
            content=content)
        return _Response(status, text, headers=[self.guard.cookie(request), *headers])

    def _error(self, request, status, message, headers=()):
        content = f"<h1>{_esc(status)}</h1><p>{_esc(message)}</p>"
        back = f'<p><a href="{request.href("/")}">Back to the tasks</a></p>'
        return self._page(request, status, content + back, status=status, headers=headers)

    def _notices(self, request):
        notices = []
        if self.guard.auth is None:
            notices.append(f'<p class="warning" role="alert">{_esc(_NO_AUTH_WARNING)}</p>')
        message, level = request.query.get("msg", ""), request.query.get("level", "ok")
        signature = self.guard.sign("flash", f"{level}\n{message}")
        if message and _web_same(request.query.get("sig", ""), signature):
            css = "error" if level == "error" else "ok"
            notices.append(f'<p class="flash {css}" role="status">{_esc(message)}</p>')
        return "".join(notices)

    # Forms -------------------------------------------------------------------

    def _form(self, request, path, label, fields=None, css="", before=""):
        """A POST form of one button, with its CSRF token and hidden ``fields``."""
        hidden = "".join(f'<input type="hidden" name="{_esc(key)}" value="{_esc(value)}">'
                         for key, value in (fields or {}).items() if value)
        return (f'<form method="post" action="{request.href(path)}">'
                f"{self.guard.csrf_field(request)}{hidden}{before}"
                f'<button type="submit" class="{css}">{_esc(label)}</button></form>')

    def _filters(self, request, view):
        options = "".join(f'<option value="{s}"{" selected" * (view["status"] == s)}>{s}'
                          "</option>" for s in STATUSES)
        names = "".join(f'<option value="{_esc(name)}">' for name in sorted(
            self.manager.registry))
        return (f'<form class="filters" method="get" action="{request.href("/")}">'
                f'<label>Status <select name="status"><option value="">all</option>{options}'
                f'</select></label><label>Task <input name="name" list="task-names" '
                f'value="{_esc(view["name"] or "")}" placeholder="module.function" size="32">'
                f'</label><datalist id="task-names">{names}</datalist>'
                f'<button type="submit">Filter</button>'
                f'<a href="{request.href("/")}">Clear</a></form>')

    def _bulk_actions(self, request, view):
        fields = {"status": view["status"], "name": view["name"]}
        which = f"Retry failed {view['name']} tasks" if view["name"] else "Retry all failed"
        days = (f'<label>Prune finished older than <input type="number" name="days" min="0" '
                f'step="any" value="{WEB_PRUNE_DAYS}" required> days</label>')
        return ('<div class="actions">' + self._form(request, "/retry-failed", which, fields)
                + self._form(request, "/prune", "Prune", fields, "danger", days) + "</div>")

    def _task_actions(self, request, doc):
        path = f"/task/{_web_quote(doc.get('id') or '', '')}"
        forms = []
        if doc.get("status") in ("failed", "cancelled"):
            forms.append(self._form(request, path + "/retry", "Retry", css="primary"))
        if doc.get("status") in ("pending", "running"):
            forms.append(self._form(request, path + "/cancel", "Cancel", css="danger"))
        return f'<div class="actions">{"".join(forms)}</div>' if forms else ""

    # Actions -----------------------------------------------------------------

    def _retry_one(self, request):
        handle = self.manager.get_task_by_id(request.task_id)
        if handle is None:
            return self._error(request, "404 Not Found", f"There is no task {request.task_id!r}.")
        if handle.retry():
            return self._back(request, self._task_path(request), "Sent back to pending: the task "
                              "will run again.")
        return self._back(request, self._task_path(request),
                          f"Not retried: {_retry_refusal(handle)}.", "error")

    def _cancel_one(self, request):
        handle = self.manager.get_task_by_id(request.task_id)
        if handle is None:
            return self._error(request, "404 Not Found", f"There is no task {request.task_id!r}.")
        running = handle.status() == "running"  # only for the wording
        if handle.cancel():
            return self._back(request, self._task_path(request), "Asked to stop: the running "
                              "task stops at its next cancellation check." if running
                              else "Cancelled.")
        return self._back(request, self._task_path(request), "Not cancelled: the task had "
                          "already finished.", "error")

    def _retry_failed(self, request):
        view = _web_view(request.fields)
        n = self.manager.requeue(status="failed", name=view["name"])
        which = f" {view['name']}" if view["name"] else ""
        return self._back(request, "/", f"{n:,} failed{which} task(s) sent back to pending.",
                          query={"status": view["status"], "name": view["name"]})

    def _prune(self, request):
        view = _web_view(request.fields)
        query = {"status": view["status"], "name": view["name"]}
        days = _web_days(request.fields.get("days", ""))
        if days is None:
            return self._back(request, "/", "Not pruned: give an age in days, like 7 or 0.5.",
                              "error", query)
        n = self.manager.prune(older_than=days * 86400)
        return self._back(request, "/", f"Pruned {n:,} task(s) finished more than {days:g} "
                          "day(s) ago.", query=query)

    def _task_path(self, request):
        return f"/task/{_web_quote(request.task_id, '')}"

    def _back(self, request, path, message, level="ok", query=None):
        """303 to ``path`` with a signed flash message: a reload never repeats the POST."""
        signature = self.guard.sign("flash", f"{level}\n{message}")
        url = request.url(path, **(query or {}), msg=message, level=level, sig=signature)
        return _Response("303 See Other", "", headers=[("Location", url)])


class _Request:
    """What the web view reads of a WSGI request."""

    def __init__(self, environ):
        import urllib.parse
        self.environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET").upper()
        self.path = _wsgi_text(environ.get("PATH_INFO", "")) or "/"
        self.base = _wsgi_text(environ.get("SCRIPT_NAME", "")).rstrip("/")
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), max_num_fields=50)
        self.query = {key: values[0] for key, values in query.items()}
        self.cookies = _web_cookies(environ.get("HTTP_COOKIE", ""))
        self.secure = environ.get("wsgi.url_scheme") == "https"
        self.task_id, self.fields, self.csrf = None, None, None

    def url(self, path, **query):
        """``path`` under this mount, with the query items that have a value."""
        import urllib.parse
        items = {key: value for key, value in query.items() if value not in (None, "")}
        tail = "?" + urllib.parse.urlencode(items) if items else ""
        return _web_quote(self.base) + path + tail

    def href(self, path, **query):
        """``url``, escaped for an HTML attribute."""
        return _esc(self.url(path, **query))

    def form(self):
        """A url-encoded POST body as {name: first value}; None when too large."""
        import urllib.parse
        try:
            length = int(self.environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > WEB_MAX_FORM:
            return None
        body = self.environ["wsgi.input"].read(length) if length > 0 else b""
        fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True,
                                       max_num_fields=50)
        return {key: values[0] for key, values in fields.items()}


class _Response:
    """A reply: ``send`` adds the length and the headers every reply has."""

    __slots__ = ("status", "body", "ctype", "headers", "cache")

    def __init__(self, status, body, ctype="text/html; charset=utf-8", headers=(),
                 cache="no-store"):
        self.status, self.ctype, self.headers, self.cache = status, ctype, list(headers), cache
        # A task's data may hold a lone surrogate (a file name from os.listdir
        # that is not UTF-8): shown as its escape, never a failed page.
        self.body = body.encode("utf-8", "backslashreplace") if isinstance(body, str) else body

    def send(self, start_response, method):
        headers = [("Content-Type", self.ctype), ("Content-Length", str(len(self.body))),
                   ("Cache-Control", self.cache), *_WEB_HEADERS, *self.headers]
        start_response(self.status, headers)
        return [] if method == "HEAD" else [self.body]


def _web_unauthorized():
    return _Response("401 Unauthorized", "Authentication required.\n",
                     "text/plain; charset=utf-8",
                     headers=[("WWW-Authenticate", 'Basic realm="castor", charset="UTF-8"')])


def _web_json(value):
    return _Response("200 OK", json.dumps(value, ensure_ascii=False),
                     "application/json; charset=utf-8")


class _WebGuard:
    """Who may: HTTP Basic auth, and the signed double-submit CSRF token."""

    def __init__(self, auth):
        import secrets
        self.auth = None if auth is None else auth.encode()
        self._secret = secrets.token_bytes(32)  # tokens die with the process

    def authorized(self, request):
        """HTTP Basic, compared in constant time; True when the app has no auth."""
        if self.auth is None:
            return True
        import base64
        import hmac
        scheme, _, value = request.environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except ValueError:  # binascii.Error: not base64
            return False
        return hmac.compare_digest(given, self.auth)

    def csrf_value(self, request):
        """The browser's random CSRF value, or a new one if it sent none we could use."""
        import secrets
        if request.csrf is None:
            sent = request.cookies.get(_CSRF_COOKIE, "")
            request.csrf = sent if _web_token_like(sent) else secrets.token_urlsafe(32)
        return request.csrf

    def csrf_ok(self, request):
        sent = request.cookies.get(_CSRF_COOKIE, "")
        token = request.fields.get("csrf", "")
        return _web_token_like(sent) and _web_same(token, self.sign("csrf", sent))

    def sign(self, purpose, text):
        import hashlib
        import hmac
        message = f"{purpose}\n{text}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def csrf_field(self, request):
        token = self.sign("csrf", self.csrf_value(request))
        return f'<input type="hidden" name="csrf" value="{token}">'

    def cookie(self, request):
        """Set-Cookie for the CSRF value: scoped to this mount, never sent cross-site."""
        path = _web_quote(request.base) + "/"
        secure = "; Secure" if request.secure else ""
        return ("Set-Cookie", f"{_CSRF_COOKIE}={self.csrf_value(request)}; Path={path}; "
                              f"HttpOnly; SameSite=Strict{secure}")


# Web view: helpers ############################################################


def _web_route(path):
    """(route key, task id): "/task/ID/retry" gives ("/task/*/retry", "ID")."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[1] == "task" and parts[2]:
        return "/".join(parts[:2] + ["*"] + parts[3:]), parts[2]
    return path, None


def _web_view(fields):
    """The list's filters from a query or a form: status, name, offset, checked."""
    status = fields.get("status") or None
    offset = fields.get("offset", "")
    offset = min(int(offset), WEB_MAX_OFFSET) if offset.isascii() and offset.isdigit() else 0
    return {"status": status if status in STATUSES else None,
            "name": fields.get("name", "").strip() or None, "offset": offset}


def _web_days(text):
    """Days from the prune form, or None if they are not a sensible age."""
    try:
        days = float(text)
    except ValueError:
        return None
    return days if 0 <= days <= MAX_SECONDS / 86400 else None  # also refuses NaN


def _wsgi_text(value):
    """A WSGI path as text: servers hand over its bytes decoded as latin-1 (PEP 3333)."""
    try:
        return value.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a server that decoded it as UTF-8 already
        return value


def _web_cookies(header):
    """{name: value} of a Cookie header; malformed pieces are skipped."""
    cookies = {}
    for piece in header.split(";"):
        name, sep, value = piece.strip().partition("=")
        if sep and name:
            cookies.setdefault(name, value.strip('"'))
    return cookies


def _web_token_like(text):
    """A CSRF value as castor makes them: short, URL-safe base64 only."""
    return 16 <= len(text) <= 128 and text.isascii() and text.replace("-", "a").replace(
        "_", "a").isalnum()


def _web_same(given, expected):
    import hmac
    return given.isascii() and hmac.compare_digest(given, expected)


def _web_quote(text, safe="/"):
    import urllib.parse
    return urllib.parse.quote(text, safe=safe)


def _esc(value):
    """Text for HTML, quotes included: everything shown from a task goes through here."""
    import html
    return html.escape("" if value is None else str(value), quote=True)


def _web_attrs(data):
    """``data-*`` attributes of the page's body: how app.js learns the page's state."""
    return "".join(f' data-{key}="{_esc(value)}"' for key, value in data.items())


def _web_time(iso):
    """2025-09-25T16:04:14.123456Z as 2025-09-25 16:04:14; "-" for none."""
    if not isinstance(iso, str) or not iso:
        return "-"
    return iso.replace("T", " ").split(".")[0].rstrip("Z")


def _web_value(value):
    """A JSON value as its JSON text, on several lines if it is large."""
    text = json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, indent=2) if len(text) > 60 else text


def _web_call(doc):
    """The arguments as a call reads them, ``1, "a", key=2``, cut to a preview."""
    args = doc.get("args") if isinstance(doc.get("args"), list) else []
    kwargs = doc.get("kwargs") if isinstance(doc.get("kwargs"), dict) else {}
    parts, size = [], 0
    pieces = [(None, arg) for arg in args] + list(kwargs.items())
    for key, value in pieces:
        parts.append(("" if key is None else f"{key}=") + json.dumps(value, ensure_ascii=False))
        size += len(parts[-1]) + 2
        if size > WEB_ARGS_PREVIEW:  # a huge argument is dumped once, never more
            break
    text = ", ".join(parts)
    return text if len(text) <= WEB_ARGS_PREVIEW else text[:WEB_ARGS_PREVIEW - 1] + "…"


def _web_progress(progress):
    """A progress report as {done, total, text}, or None; a task wrote it, so check it."""
    if not isinstance(progress, dict):
        return None
    done, total = progress.get("done"), progress.get("total")
    if not _web_number(done):
        return None
    total = total if _web_number(total) and total > 0 else None
    text = f"{done:g}/{total:g}" if total else f"{done:g}"
    message = progress.get("message")
    return {"done": done, "total": total,
            "text": f"{text} {message}" if isinstance(message, str) and message else text}


def _web_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _web_row(doc, now):
    """What the list shows of a task, for the page and /api/summary alike."""
    return {"id": str(doc.get("id")), "task_name": str(doc.get("task_name")),
            "status": str(doc.get("status")), "args": _web_call(doc),
            "enqueued": _web_time(doc.get("enqueued_at")), "ran": _web_ran(doc, now),
            "attempts": doc.get("attempts", 0), "progress": _web_progress(doc.get("progress"))}


def _web_ran(doc, now):
    """How long it ran; for a task scheduled later, when it is due."""
    if doc.get("status") == "pending" and doc.get("eta"):
        return f"due {_web_time(doc['eta'])}"
    return _duration(doc, now)


def _web_table(headers, rows, css="", body_id=""):
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    tbody = f'<tbody id="{body_id}">' if body_id else "<tbody>"
    return f'<table class="{css}"><thead><tr>{head}</tr></thead>{tbody}{body}</tbody></table>'


def _web_badge(status):
    return f'<span class="badge s-{_esc(status)}">{_esc(status)}</span>'


# Web view: the overview #######################################################


def _web_counts(request, counts, view):
    cards = [("all", sum(counts.values()), None)]
    cards += [(status, counts.get(status, 0), status) for status in STATUSES]
    return '<section class="counts">' + "".join(
        f'<a class="count s-{key}{" on" * (view["status"] == status)}" '
        f'href="{request.href("/", status=status, name=view["name"])}">'
        f'<span class="n" id="count-{key}" data-n="{n}">{n:,}</span>{key}</a>'
        for key, n, status in cards) + "</section>"


def _web_task_table(request, view, rows, more):
    table = _web_table(("Status", "Task", "Arguments", "Enqueued (UTC)", "Ran", "Attempts",
                        "Progress"), [_web_cells(request, row) for row in rows],
                       "tasks", "task-rows")
    query = {"status": view["status"], "name": view["name"]}
    newer = request.href("/", **query, offset=max(0, view["offset"] - WEB_PAGE_SIZE) or None)
    older = request.href("/", **query, offset=view["offset"] + WEB_PAGE_SIZE)
    hide = ' hidden' if rows else ""
    return (f'<section><h2>Tasks <span class="live muted" id="live"></span></h2>{table}'
            f'<p class="muted" id="no-tasks"{hide}>No tasks.</p><nav class="pager">'
            f'<a id="newer" href="{newer}"{" hidden" * (view["offset"] == 0)}>← Newer</a>'
            f'<a id="older" href="{older}"{" hidden" * (not more)}>Older →</a></nav></section>')


def _web_cells(request, row):
    """A row of the list as HTML cells; app.js builds the very same from JSON."""
    link = request.href(f"/task/{_web_quote(row['id'], '')}")
    progress = row["progress"]
    bar = ""
    if progress is not None:
        meter = (f'<progress max="{progress["total"]:g}" value="{progress["done"]:g}">'
                 "</progress> " if progress["total"] else "")
        bar = f'<span class="progress">{meter}{_esc(progress["text"])}</span>'
    return [_web_badge(row["status"]), f'<a href="{link}">{_esc(row["task_name"])}</a>',
            f'<code class="args">{_esc(row["args"])}</code>', _esc(row["enqueued"]),
            _esc(row["ran"]), _esc(row["attempts"]), bar]


def _web_workers(workers):
    rows = [[_esc(w.get("id")), _esc(w.get("host")), _esc(w.get("pid")),
             _esc(_web_time(w.get("started_at"))), _web_age(w.get("age")),
             _esc(_pools_text(w.get("pools"))), _esc(w.get("version") or "-"),
             _esc(w.get("target") or "-")] for w in workers]
    table = _web_table(("Worker", "Host", "PID", "Started (UTC)", "Heartbeat", "Pools",
                        "Version", "Target"), rows, "workers")
    none = "" if rows else '<p class="muted">No worker is running.</p>'
    return f"<section><h2>Workers</h2>{table if rows else none}</section>"


def _web_age(age):
    if not _web_number(age):
        return "-"
    late = ' class="stale"' if age > 3 * HEARTBEAT_INTERVAL else ""
    return f"<span{late}>{age:.1f} s ago</span>"


def _web_periodic(periodic):
    if not periodic:
        return ""
    rows = [[_esc(p.get("name")), _esc(p.get("schedule")), _esc(_web_time(p.get("next_run")))]
            for p in periodic]
    table = _web_table(("Periodic task", "Schedule", "Next run (UTC)"), rows, "periodic")
    return f"<section><h2>Periodic tasks</h2>{table}</section>"


# Web view: the task page ######################################################


def _web_task_head(request, doc):
    return (f'<p><a href="{request.href("/")}">← All tasks</a></p>'
            f'<h1>{_esc(doc.get("task_name"))} {_web_badge(doc.get("status"))}</h1>'
            f'<p class="muted mono">{_esc(doc.get("id"))}</p>')


def _web_task_body(doc):
    parts = [_web_details(doc), _web_task_progress(doc.get("progress")),
             f'<h2>Arguments</h2><pre id="args">{_esc(_web_value(doc.get("args") or []))}</pre>',
             f'<h2>Keyword arguments</h2><pre id="kwargs">'
             f'{_esc(_web_value(doc.get("kwargs") or {}))}</pre>']
    if doc.get("status") == "success":
        parts.append(f'<h2>Result</h2><pre id="result">{_esc(_web_value(doc.get("result")))}</pre>')
    if doc.get("error"):
        parts.append(_web_error(doc))
    parts.append(_web_history(doc.get("history")))
    return "".join(parts)


def _web_details(doc):
    tries = doc.get("retries", 0) + 1 if isinstance(doc.get("retries"), int) else "?"
    items = [("Status", doc.get("status")), ("Mode", doc.get("mode")),
             ("Priority", doc.get("priority")), ("Attempts", f"{doc.get('attempts')} of {tries}"),
             ("Losses", doc.get("losses")), ("Worker", doc.get("worker") or "-"),
             ("Enqueued (UTC)", _web_time(doc.get("enqueued_at"))),
             ("Due (UTC)", _web_time(doc.get("eta"))),
             ("Started (UTC)", _web_time(doc.get("started_at"))),
             ("Finished (UTC)", _web_time(doc.get("finished_at"))),
             ("Ran", _duration(doc, time.time()) or "-")]
    if doc.get("requeued_at"):
        items.append(("Requeued (UTC)", _web_time(doc.get("requeued_at"))))
    rows = "".join(f"<dt>{_esc(key)}</dt><dd>{_esc(value)}</dd>" for key, value in items)
    return f'<dl class="details">{rows}</dl>'


def _web_task_progress(progress):
    shown = _web_progress(progress)
    if shown is None:
        return ""
    bar = (f'<progress class="wide" max="{shown["total"]:g}" value="{shown["done"]:g}">'
           "</progress> " if shown["total"] else "")
    at = _web_time(progress.get("at"))
    return (f'<h2>Progress</h2><p>{bar}{_esc(shown["text"])} '
            f'<span class="muted">at {_esc(at)} UTC</span></p>')


def _web_error(doc):
    exc = doc.get("exception") if isinstance(doc.get("exception"), dict) else {}
    module = exc.get("module") if exc.get("module") != "builtins" else None
    kind = ".".join(str(part) for part in (module, exc.get("qualname")) if part)
    summary = f"{kind}: {exc.get('message', '')}" if kind else ""
    title = "Cancelled" if doc.get("status") == "cancelled" else "Error"
    return (f"<h2>{title}</h2>" + (f'<p class="error-line">{_esc(summary)}</p>' * bool(summary))
            + f'<pre class="traceback">{_esc(doc.get("error"))}</pre>')


def _web_history(history):
    """Earlier runs of a retried task: status, attempts, times, and the error."""
    if not isinstance(history, list) or not history:
        return ""
    rows = []
    for n, past in enumerate(history, 1):
        past = past if isinstance(past, dict) else {}
        error = str(past.get("error") or "")
        last = error.strip().splitlines()[-1] if error.strip() else "-"
        shown = (f"<details><summary>{_esc(last)}</summary><pre>{_esc(error)}</pre></details>"
                 if error else "-")
        rows.append([str(n), _web_badge(past.get("status")), _esc(past.get("attempts")),
                     _esc(_web_time(past.get("started_at"))),
                     _esc(_web_time(past.get("finished_at"))), shown])
    table = _web_table(("Run", "Status", "Attempts", "Started (UTC)", "Finished (UTC)",
                        "Error"), rows, "history")
    return f"<h2>History</h2>{table}"


# Web view: serving ############################################################


def _serve_web(manager, host, port, auth):
    """``castor web``: serve until Ctrl+C or SIGTERM, then return 0."""
    try:
        server = _web_server(manager.wsgi_app(auth=auth), host, port)
    except OSError as exc:
        logger.error("cannot serve the web view on %s:%s: %s", host, port, exc)
        return 1
    restore = _stop_on_signals()  # before the address shows: a signal from then on stops it
    try:
        shown = f"[{host}]" if ":" in host else host
        logger.info("Serving the castor web view on http://%s:%d/", shown, server.server_port)
        if auth is None and not _is_loopback(host):
            logger.warning("The web view has no authentication and %s is not a loopback "
                           "address: anyone who can reach it can retry, cancel and prune "
                           "tasks (use --auth USER:PASSWORD)", host or "every address")
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("Web view stopped")
    finally:
        restore()
        server.server_close()
    return 0


def _web_server(app, host, port):
    """A wsgiref server for ``app``, a thread per request (port 0: any free port)."""
    server_class, handler_class = _web_server_classes()
    server = server_class((host, port), handler_class)
    server.set_app(app)
    return server


@functools.cache
def _web_server_classes():
    import socket
    import socketserver
    from wsgiref import simple_server

    class Server(socketserver.ThreadingMixIn, simple_server.WSGIServer):
        daemon_threads = True  # a browser's open connection never holds up the exit

        def __init__(self, address, handler):
            if ":" in address[0]:
                self.address_family = socket.AF_INET6
            super().__init__(address, handler)

        def handle_error(self, request, client_address):
            # A browser that hung up is no news; the app logs its own errors.
            logger.debug("web view: connection from %s failed", client_address, exc_info=True)

    class Handler(simple_server.WSGIRequestHandler):
        def log_message(self, format, *args):
            logger.debug("web view: %s %s", self.address_string(), format % args)
    return Server, Handler


def _is_loopback(host):
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" for every address: it may be reachable
        return False


def _stop_on_signals():
    """SIGINT and SIGTERM stop the server; returns what puts things back.

    SIGINT too, as for the worker: a process started in the background by a
    shell inherits SIGINT ignored, and Python then leaves it ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


# Web view: page, script and style #############################################

#: The frame of every page; what goes in is escaped first.
_WEB_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · castor</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{css}">
<script src="{js}" defer></script>
</head>
<body{attrs}>
<header><a class="brand" href="{home}">castor</a><span class="muted mono">{store}</span></header>
<main>
{notices}{content}
</main>
</body>
</html>
"""

#: The rate chart; app.js draws its line from successive counts.
_WEB_CHART = """\
<section class="rate"><div class="rate-head">Finished per second \
<strong id="rate-now">-</strong> <span class="muted" id="rate-max"></span></div>\
<svg id="rate-chart" viewBox="0 0 300 60" preserveAspectRatio="none" role="img" \
aria-label="Tasks finished per second, last two minutes">\
<line class="axis" x1="0" y1="59" x2="300" y2="59"></line>\
<polygon id="rate-area" points=""></polygon>\
<polyline id="rate-line" points=""></polyline></svg></section>"""

#: The overview's script: counts, rate chart and list, from /api/summary.
_WEB_JS = r"""// castor web view. Task data goes into textContent and attributes only,
// never into innerHTML: a task's "<script>" stays text.
"use strict";
(() => {
  const data = document.body.dataset;
  const STATUSES = ["pending", "running", "success", "failed", "cancelled"];
  const POINTS = 60;  // rate samples drawn: two minutes at one poll per 2 s
  const rates = [];
  let last = null;

  function dropFlash() {  // a reload must not show the message again
    const url = new URL(location.href);
    if (!url.searchParams.has("msg")) return;
    for (const key of ["msg", "level", "sig"]) url.searchParams.delete(key);
    history.replaceState(null, "", url);
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function cell(content) {
    const td = document.createElement("td");
    td.append(content);  // a string becomes a text node
    return td;
  }

  function progress(p) {
    if (!p) return "";
    const span = el("span", "progress");
    if (p.total) {
      const bar = el("progress");
      bar.max = p.total;
      bar.value = p.done;
      span.append(bar, " ");
    }
    span.append(p.text);
    return span;
  }

  function row(task) {  // the same cells as _web_cells on the server
    const link = el("a", null, task.task_name);
    link.href = data.base + "/task/" + encodeURIComponent(task.id);
    const tr = document.createElement("tr");
    tr.dataset.id = task.id;
    tr.append(cell(el("span", "badge s-" + task.status, task.status)), cell(link),
              cell(el("code", "args", task.args)), cell(task.enqueued), cell(task.ran),
              cell(String(task.attempts)), cell(progress(task.progress)));
    return tr;
  }

  function setCount(key, n) {
    const node = document.getElementById("count-" + key);
    node.dataset.n = n;
    node.textContent = n.toLocaleString("en-US");
  }

  function finished(counts) {
    return counts.success + counts.failed + counts.cancelled;
  }

  function sample(counts) {  // finished per second since the previous poll
    const now = performance.now(), done = finished(counts);
    if (last !== null && now > last.at) {
      rates.push(Math.max(0, (done - last.done) * 1000 / (now - last.at)));  // prune lowers it
      if (rates.length > POINTS) rates.shift();
    }
    last = {at: now, done: done};
  }

  function draw() {
    const top = Math.max(1, ...rates);
    const span = Math.max(rates.length, 12) - 1;  // a few samples are not squeezed
    const points = rates.map((rate, i) => {
      const x = 300 * (span - rates.length + 1 + i) / Math.max(span, 1);
      return x.toFixed(1) + "," + (58 - 56 * rate / top).toFixed(1);
    });
    document.getElementById("rate-line").setAttribute("points", points.join(" "));
    const area = points.length ? [points[0].split(",")[0] + ",59", ...points,
                                  points[points.length - 1].split(",")[0] + ",59"] : [];
    document.getElementById("rate-area").setAttribute("points", area.join(" "));
    const now = rates.length ? rates[rates.length - 1] : null;
    document.getElementById("rate-now").textContent = now === null ? "-" : now.toFixed(1);
    document.getElementById("rate-max").textContent = "(scale " + top.toFixed(1) + "/s)";
  }

  function render(summary) {
    let total = 0;
    for (const status of STATUSES) {
      setCount(status, summary.counts[status] || 0);
      total += summary.counts[status] || 0;
    }
    setCount("all", total);
    document.getElementById("task-rows").replaceChildren(...summary.tasks.map(row));
    document.getElementById("no-tasks").hidden = summary.tasks.length > 0;
    document.getElementById("older").hidden = !summary.more;
    sample(summary.counts);
    draw();
  }

  function live(ok) {
    const node = document.getElementById("live");
    node.classList.toggle("down", !ok);
    node.textContent = ok ? "live, " + new Date().toLocaleTimeString() : "not updating: "
      + "the server did not answer";
  }

  function poll() {
    if (document.hidden) {  // a background tab costs the server nothing
      setTimeout(poll, Number(data.poll));
      return;
    }
    const query = new URLSearchParams();
    for (const key of ["status", "name", "offset"]) if (data[key]) query.set(key, data[key]);
    fetch(data.base + "/api/summary?" + query, {headers: {Accept: "application/json"},
                                               credentials: "same-origin", cache: "no-store"})
      .then((reply) => { if (!reply.ok) throw new Error(reply.status); return reply.json(); })
      .then(render)
      .then(() => live(true), () => live(false))
      .finally(() => setTimeout(poll, Number(data.poll)));
  }

  dropFlash();
  if (data.page === "overview") {
    const counts = {};
    for (const status of STATUSES) {
      counts[status] = Number(document.getElementById("count-" + status).dataset.n);
    }
    sample(counts);
    setTimeout(poll, Number(data.poll));
  }
})();
"""

#: The stylesheet: light or dark as the system is.
_WEB_CSS = """\
:root { color-scheme: light dark; --fg: #1d2430; --muted: #667085; --bg: #f6f7f9;
  --card: #fff; --line: #dde1e7; --accent: #2f6fde; --pending: #0e7490;
  --running: #b7791f; --success: #2f855a; --failed: #c53030; --cancelled: #9f3ab0; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e9ef; --muted: #98a2b3; --bg: #14171c; --card: #1c2027;
    --line: #2e343d; --accent: #6ea8fe; }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: var(--bg); }
header { display: flex; gap: 1rem; align-items: baseline; padding: .6rem 1.2rem;
  background: var(--card); border-bottom: 1px solid var(--line); }
.brand { font-weight: 700; font-size: 1.15rem; color: var(--fg); text-decoration: none; }
main { max-width: 1200px; margin: 0 auto; padding: 1rem 1.2rem 3rem; }
h1 { font-size: 1.35rem; margin: .3rem 0; overflow-wrap: anywhere; }
h2 { font-size: 1rem; margin: 1.4rem 0 .5rem; }
a { color: var(--accent); }
.muted { color: var(--muted); }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12.5px; }
pre { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
  padding: .6rem .8rem; overflow: auto; max-height: 30rem; white-space: pre-wrap;
  overflow-wrap: anywhere; margin: 0; }
.warning { background: #fff4e5; color: #7a4100; border: 1px solid #f3c27b;
  border-radius: 6px; padding: .5rem .8rem; }
.flash { border-radius: 6px; padding: .5rem .8rem; background: var(--card);
  border: 1px solid var(--line); border-left: 4px solid var(--success); }
.flash.error { border-left-color: var(--failed); }
.top { display: flex; flex-wrap: wrap; gap: 1rem; align-items: stretch; margin-top: .5rem; }
.counts { display: flex; flex-wrap: wrap; gap: .5rem; }
.count { display: flex; flex-direction: column; min-width: 6.5rem; padding: .45rem .8rem;
  background: var(--card); border: 1px solid var(--line); border-top: 3px solid var(--line);
  border-radius: 8px; text-decoration: none; color: var(--muted); }
.count .n { font-size: 1.5rem; font-weight: 600; color: var(--fg);
  font-variant-numeric: tabular-nums; }
.count.on { outline: 2px solid var(--accent); }
.rate { flex: 1 1 260px; background: var(--card); border: 1px solid var(--line);
  border-radius: 8px; padding: .45rem .8rem; color: var(--muted); }
.rate strong { color: var(--fg); }
.rate svg { display: block; width: 100%; height: 60px; margin-top: .2rem; }
#rate-line { fill: none; stroke: var(--accent); stroke-width: 2;
  vector-effect: non-scaling-stroke; }
#rate-area { fill: var(--accent); opacity: .15; stroke: none; }
.axis { stroke: var(--line); vector-effect: non-scaling-stroke; }
table { border-collapse: collapse; width: 100%; background: var(--card);
  border: 1px solid var(--line); }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: 12px; }
.tasks td:nth-child(4), .tasks td:nth-child(5), .workers td { white-space: nowrap; }
code.args { display: inline-block; max-width: 26rem; overflow: hidden;
  text-overflow: ellipsis; white-space: nowrap; vertical-align: bottom; }
.badge { display: inline-block; padding: 0 .5rem; border-radius: 999px; font-size: 12px;
  font-weight: 600; color: #fff; background: var(--muted); }
.s-pending { border-top-color: var(--pending); } .badge.s-pending { background: var(--pending); }
.s-running { border-top-color: var(--running); } .badge.s-running { background: var(--running); }
.s-success { border-top-color: var(--success); } .badge.s-success { background: var(--success); }
.s-failed { border-top-color: var(--failed); } .badge.s-failed { background: var(--failed); }
.s-cancelled { border-top-color: var(--cancelled); }
.badge.s-cancelled { background: var(--cancelled); }
h1 .badge { font-size: 13px; vertical-align: middle; }
form { display: inline-flex; flex-wrap: wrap; gap: .4rem; align-items: center; margin: 0; }
.filters, .actions { display: flex; flex-wrap: wrap; gap: .6rem 1.2rem; align-items: center;
  margin: 1rem 0 .4rem; }
button { font: inherit; padding: .28rem .8rem; border-radius: 6px; cursor: pointer;
  border: 1px solid var(--line); background: var(--card); color: var(--fg); }
button.primary { background: var(--accent); border-color: var(--accent); color: #fff; }
button.danger { color: var(--failed); border-color: var(--failed); }
input, select { font: inherit; padding: .22rem .4rem; border: 1px solid var(--line);
  border-radius: 6px; background: var(--card); color: var(--fg); }
input[type=number] { width: 5rem; }
.pager { display: flex; gap: 1.2rem; margin: .5rem 0; }
.live { font-weight: normal; font-size: 12px; margin-left: .5rem; }
.live.down, .stale, .error-line { color: var(--failed); }
progress { width: 7rem; vertical-align: middle; }
progress.wide { width: 18rem; }
dl.details { display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1.2rem;
  background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: .6rem .9rem; margin: 1rem 0 0; }
dl.details dt { color: var(--muted); }
dl.details dd { margin: 0; overflow-wrap: anywhere; }
details summary { cursor: pointer; }
"""


# CLI ##########################################################################
#
# ``castor MODULE:VARIABLE`` runs a worker; ``castor COMMAND MODULE:VARIABLE``
# inspects and operates the store. Usage errors exit 2 with one line on
# stderr; "not found" exits 1.

#: The inspection commands, beside the worker command.
_COMMAND_HELP = {
    "tasks": "list tasks, newest first",
    "info": "show one task's document",
    "retry": "run failed or cancelled tasks again",
    "cancel": "cancel pending or running tasks",
    "prune": "delete finished tasks older than a given age",
    "stats": "counts, workers and periodic tasks",
    "web": "serve the web view",
}


def main(argv=None):
    """The ``castor`` command; returns its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in _COMMAND_HELP else None
    args = _parser(command).parse_args(argv[1:] if command else argv)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like python -m: the project is importable
    try:
        manager = _load_app(args.target, args.imports)
    except _UsageError as exc:
        sys.stderr.write(f"castor: error: {exc}\n")
        return 2
    except _OpenFailed as exc:
        sys.stderr.write(f"castor: error: {exc}\n")
        return 1
    if not isinstance(manager, Manager):  # the app uses another copy of castor
        return sys.modules[type(manager).__module__].main(argv)
    try:
        return _COMMANDS[command or "worker"](manager, args)
    except StoreError as exc:  # a server down, a full disk: said in one line
        sys.stderr.write(f"castor: error: {exc}\n")
        return 1


def _load_app(target, imports=()):
    """``_load_target``, retried while a brand-new database file is "locked".

    Processes that open a new beaver file at the same moment race to switch
    it to WAL; SQLite fails the losers at once, whatever the busy timeout.
    """
    deadline, pause = time.monotonic() + OPEN_RETRY_TIMEOUT, 0.02
    while True:
        try:
            return _load_target(target, imports)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise _OpenFailed(f"could not open the app's database: {exc} (still, after "
                                  f"{OPEN_RETRY_TIMEOUT:g}s of retries)") from None
        time.sleep(pause * random.uniform(0.5, 1.5))
        pause = min(pause * 2, 0.5)


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
    if not getattr(type(obj), "_castor_manager", False):
        raise _UsageError(f"{target} is a {type(obj).__name__}, not a castor.Manager")
    return obj


def _import(name):
    import importlib
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise _UsageError(f"no module named {name!r} (run castor from the "
                              "directory that holds it)") from None
        raise


def _parser(command):
    if command is None:
        parser = _parser_class()(
            prog="castor", description="Run a castor worker for MODULE:VARIABLE (a Manager). "
            f"Other commands: {', '.join(_COMMAND_HELP)} (castor COMMAND --help).")
    else:
        parser = _parser_class()(prog=f"castor {command}", description=_COMMAND_HELP[command])
    parser.add_argument("target", metavar="MODULE:VARIABLE", help="e.g. main:manager")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="also import MODULE to register its tasks")
    _ARGUMENTS[command or "worker"](parser)
    return parser


@functools.cache
def _parser_class():
    import argparse

    class OneLineParser(argparse.ArgumentParser):
        """argparse, but a usage error is one line and exit status 2."""

        def error(self, message):
            self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
    return OneLineParser


def _worker_arguments(parser):
    parser.add_argument("--workers", type=_count, default=None,
                        help="processes for mode='process' tasks (default: CPU count)")
    parser.add_argument("--threads", type=_count, default=None,
                        help="threads for mode='thread' tasks (default: workers * 2)")
    parser.add_argument("--async-tasks", type=_count, default=ASYNC_TASKS,
                        help=f"mode='async' tasks at once (default: {ASYNC_TASKS})")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="show a live dashboard in the terminal")
    _log_level_argument(parser)
    parser.add_argument("--version", action="version", version=f"castor {__version__}")


def _log_level_argument(parser):
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="castor's log level (default: INFO)")


def _tasks_arguments(parser):
    parser.add_argument("--status", choices=STATUSES, help="only tasks of this status")
    parser.add_argument("--name", help="only tasks of this name (module.function)")
    parser.add_argument("--limit", type=_count, default=20, help="at most this many (20)")
    _json_argument(parser)


def _info_arguments(parser):
    parser.add_argument("id", help="the task id")
    _json_argument(parser)


def _retry_arguments(parser):
    parser.add_argument("ids", nargs="*", metavar="ID", help="task ids")
    parser.add_argument("--failed", action="store_true", help="every failed task")
    parser.add_argument("--cancelled", action="store_true", help="every cancelled task")
    parser.add_argument("--name", help="with --failed or --cancelled: only this task name")
    _json_argument(parser)


def _cancel_arguments(parser):
    parser.add_argument("ids", nargs="+", metavar="ID", help="task ids")
    _json_argument(parser)


def _prune_arguments(parser):
    parser.add_argument("--older-than", required=True, type=_age, metavar="AGE",
                        help="finished longer ago than this: 3600, 90s, 15m, 12h, 7d, 2w")
    _json_argument(parser)


def _web_arguments(parser):
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="port (8000)")
    parser.add_argument("--auth", metavar="USER:PASSWORD", type=_credentials,
                        help="require HTTP basic authentication (or set CASTOR_WEB_AUTH)")
    _log_level_argument(parser)


def _json_argument(parser):
    parser.add_argument("--json", action="store_true", help="JSON for scripts")


def _count(text):
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


#: Units of ``--older-than``, in seconds.
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _age(text):
    import argparse
    unit = text[-1:].lower()
    number = text[:-1] if unit in _AGE_UNITS else text
    try:
        seconds = float(number) * _AGE_UNITS.get(unit, 1)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"expected an age like 3600, 90s, 15m, 12h, 7d or 2w, "
                                         f"got {text!r}")
    return seconds


def _port(text):
    import argparse
    if not (text.isascii() and text.isdigit() and int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return int(text)


def _credentials(text):
    import argparse
    if not _is_credentials(text):
        raise argparse.ArgumentTypeError("expected USER:PASSWORD")
    return text


def _is_credentials(text):
    return ":" in text and bool(text.split(":", 1)[0])


#: Each command's own arguments.
_ARGUMENTS = {"worker": _worker_arguments, "tasks": _tasks_arguments,
              "info": _info_arguments, "retry": _retry_arguments,
              "cancel": _cancel_arguments, "prune": _prune_arguments,
              "stats": _json_argument, "web": _web_arguments}


# CLI: the worker ##############################################################


def _run_worker(manager, args):
    worker = Worker(manager, args.workers, args.threads, async_tasks=args.async_tasks,
                    target=args.target, imports=args.imports)
    handler = _setup_logging(args.log_level)
    try:
        if args.interactive and sys.stdout.isatty():
            return _run_dashboard(worker, args.target, handler)
        if args.interactive:
            logger.info("stdout is not a terminal: no dashboard, plain logs instead")
        logger.info("Starting server... Ctrl+C to stop.")
        return worker.run()
    finally:
        handler.flush()


def _setup_logging(level):
    """A handler on castor's own logger; the logging module's globals and the
    root logger stay as the user's code has them."""
    handler = _BatchingHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


class _Formatter(logging.Formatter):
    """``2026-11-22 08:39:06,226 INFO    message``, the clock cached per second.

    Built directly rather than through a format string: a busy worker
    formats thousands of lines a second.
    """

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)-7s %(message)s")

    def formatTime(self, record, datefmt=None):
        return f"{_local_seconds(int(record.created))},{int(record.msecs):03d}"

    def format(self, record):
        text = f"{self.formatTime(record)} {record.levelname:<7} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


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
        elif not self._waiting.is_set():
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


# CLI: inspection ##############################################################


def _tasks_command(manager, args):
    docs = manager.tasks(status=args.status, limit=args.limit, name=args.name)
    if args.json:
        return _print_json(docs)
    rows = [(doc["id"], doc.get("status"), doc.get("task_name"), doc.get("attempts"),
             doc.get("enqueued_at"), _duration(doc, time.time()) or "-") for doc in docs]
    _print_table(("ID", "STATUS", "NAME", "ATTEMPTS", "ENQUEUED (UTC)", "RAN"), rows)
    return 0


def _info_command(manager, args):
    handle = manager.get_task_by_id(args.id)
    if handle is None:
        sys.stderr.write(f"castor: no task {args.id!r}\n")
        return 1
    doc = handle.info()
    if args.json:
        return _print_json(doc)
    for key, value in doc.items():
        if key not in ("error", "exception"):
            sys.stdout.write(f"{key:12} {json.dumps(value)}\n")
    if doc.get("error"):  # cleaned: a task's message must not drive the terminal
        lines = str(doc["error"]).splitlines()
        sys.stdout.write("error:\n" + "".join(_clean(line) + "\n" for line in lines))
    return 0


def _retry_command(manager, args):
    if bool(args.ids) == bool(args.failed or args.cancelled):
        return _usage("retry", "give task ids, or --failed / --cancelled")
    if args.ids and args.name is not None:
        return _usage("retry", "--name goes with --failed / --cancelled, not with task ids")
    if not args.ids:
        statuses = [s for s in ("failed", "cancelled") if getattr(args, s)]
        n = sum(manager.requeue(status, name=args.name) for status in statuses)
        return _report(args, {"retried": n}, f"{n} task(s) back to pending")
    return _each_id(manager, args, "retry", "retried", _retry_refusal)


def _retry_refusal(handle):
    status = handle.status()
    if status == "success":
        return "it succeeded"
    if status in ("failed", "cancelled"):  # refused all the same: a unique task's twin
        return "the same unique task is pending or running"
    return "it has not finished"


def _cancel_command(manager, args):
    return _each_id(manager, args, "cancel", "cancelled", lambda handle: "already finished")


def _each_id(manager, args, action, done_word, refusal):
    """Apply a handle action to each id: exit 1 if any was missing or refused.
    ``refusal(handle)`` says why one was refused."""
    result = {done_word: [], "not_found": [], "refused": []}
    reasons = {}
    for task_id in args.ids:
        handle = manager.get_task_by_id(task_id)
        if handle is None:
            result["not_found"].append(task_id)
        elif getattr(handle, action)():
            result[done_word].append(task_id)
        else:
            result["refused"].append(task_id)
            reasons[task_id] = refusal(handle)
    lines = [f"{task_id}: {done_word}" for task_id in result[done_word]]
    lines += [f"{task_id}: not found" for task_id in result["not_found"]]
    lines += [f"{task_id}: not {done_word}: {reasons[task_id]}" for task_id in result["refused"]]
    _report(args, result, "\n".join(lines))
    return 1 if result["not_found"] or result["refused"] else 0


def _prune_command(manager, args):
    n = manager.prune(older_than=args.older_than)
    return _report(args, {"pruned": n}, f"pruned {n} finished task(s)")


def _stats_command(manager, args):
    stats = {"store": manager.path, "counts": manager.counts(), "workers": manager.workers(),
             "periodic": manager.periodic()}
    if args.json:
        return _print_json(stats)
    _print_table(("STATUS", "TASKS"), [(k, f"{v:,}") for k, v in stats["counts"].items()])
    sys.stdout.write("\n")
    _print_table(("WORKER", "HOST", "PID", "HEARTBEAT (UTC)", "POOLS"), [
        (w["id"], w["host"], w["pid"], w["heartbeat_at"], _pools_text(w.get("pools")))
        for w in stats["workers"]])
    if stats["periodic"]:
        sys.stdout.write("\n")
        _print_table(("PERIODIC TASK", "SCHEDULE", "NEXT RUN (UTC)"), [
            (p["name"], p["schedule"], p["next_run"] or "-") for p in stats["periodic"]])
    return 0


def _pools_text(pools):
    return " ".join(f"{mode}={size}" for mode, size in (pools or {}).items()) or "-"


def _report(args, data, text):
    if args.json:
        return _print_json(data)
    sys.stdout.write(text + "\n" if text else "")
    return 0


def _usage(command, message):
    sys.stderr.write(f"castor {command}: error: {message} (see castor {command} --help)\n")
    return 2


def _print_json(value):
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    return 0


def _print_table(headers, rows):
    """Columns as wide as their widest cell, cells cleaned of control characters."""
    rows = [[_clean(str(cell)) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    for row in [list(headers)] + rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
    if not rows:
        sys.stdout.write("(none)\n")


def _web_command(manager, args):
    auth = args.auth or os.environ.get("CASTOR_WEB_AUTH") or None
    if auth is not None and not _is_credentials(auth):  # never echoed: it is a secret
        sys.stderr.write("castor web: error: CASTOR_WEB_AUTH: expected USER:PASSWORD\n")
        return 2
    handler = _setup_logging(args.log_level)
    try:
        return _serve_web(manager, args.host, args.port, auth)
    finally:
        handler.flush()


#: What each command runs once the app is loaded.
_COMMANDS = {"worker": _run_worker, "tasks": _tasks_command, "info": _info_command,
             "retry": _retry_command, "cancel": _cancel_command, "prune": _prune_command,
             "stats": _stats_command, "web": _web_command}


if __name__ == "__main__":
    sys.exit(main())
