"""Benchmark castor against its peers (SPEC section 8, and round 2).

Run it from the repository root with the project's virtualenv (castor, beaver-db
and huey installed; for --postgres also psycopg, pgqueuer 1.6 with typer < 0.29,
and asyncpg: ``pip install -e '.[bench]' asyncpg``):

    python bench/bench.py                   # full run, several minutes on 2 cores
    python bench/bench.py --quick           # smoke run, about two minutes
    python bench/bench.py --quick --postgres        # and the PostgreSQL rows (root)
    python bench/bench.py --postgres-only           # only the PostgreSQL rows
    python bench/bench.py --tasks 10000 --full 50000 --repeats 5
    python bench/bench.py --profile  # also profile castor's worker while it drains

It benchmarks the ``castor.py`` next to this directory (not an installed copy):
the worker subprocesses get the repository on PYTHONPATH. The output is one
table: each row names castor's figure, its peer's, the ratio castor / peer, the
target and a verdict. The machine is shared and noisy, so every comparison is
made side by side in the same run, and where it helps the two sides alternate.

Castor and huey run one after the other on the same machine and the same work,
each in a fresh temporary directory holding a generated task module
(``benchtasks.py`` for castor, ``benchhuey.py`` for huey) and its database. The
task is a no-op that returns ``time.time()``: a non-None result, so huey stores
it as castor does, and a timestamp of when it ran.

Workers are real subprocesses started like a user would:

    castor:  python -m castor --workers 1 --threads 4 benchtasks:manager
    huey:    huey_consumer benchhuey.huey -w 4 -k thread -d 0.001 -m 0.05
             (run as python -m huey.bin.huey_consumer; huey tuned for speed)

Huey uses ``SqliteHuey(filename=...)`` with its defaults otherwise (results on,
store_none off, journal_mode wal, fsync None: SQLite's default
synchronous=FULL; cache_mb 8, timeout 5). Castor's own connections use WAL with
synchronous=NORMAL (beaver's setting). Client-side, huey's blocking
``result.get(blocking=True)`` keeps its default polling (0.05 s, x1.15 backoff,
capped at 1 s); castor's ``join`` polls SQLite's ``PRAGMA data_version``.

How each figure is measured (medians of ``--repeats`` runs where repeated).
Drain rates are always (N - 1) / (last task's timestamp - first task's), the
timestamps being the tasks' own ``time.time()`` results: interpreter start-up
and imports are outside them.
  1. enqueue, single: N calls of ``task.delay()`` / huey's ``task()``, no worker;
     target castor >= 1x huey.
     1b. the same castor figure against huey with ``fsync=False``
     (synchronous=OFF); round-2 target castor >= 1x.
  2. enqueue, bulk: castor ``Task.map`` of N items in one call; huey has no bulk
     enqueue API, so its figure is its per-call enqueue rate from row 1; >= 10x.
  3. drain: N tasks enqueued with no worker, then the worker is started. The wall
     time from spawning the worker until the store shows all N finished is in
     the notes. Round-2 target castor >= 5x huey (SPEC section 8: 3x).
  4. latency: with an idle worker already running (warmed up), N times in a row
     ``delay()`` then ``join()`` / ``result.get(blocking=True)``; p50 (target
     <= 0.2x huey) and p99.
  5. idle CPU: after the latency run and 2 s of settling, utime+stime (and the
     reaped children's cutime+cstime) of the worker and all its descendants, read
     from /proc before and after ``--idle`` seconds, as % of one core; castor < 2%.
  6. store size (castor only): a file with 100,000 finished tasks (written
     through castor's public ``Manager(db, immediate=True)`` path) against an
     empty one, side by side, their measurements alternating: single ``delay()``
     rate with no worker, then drain rate of batches enqueued with ``.map`` (one
     transaction) while both stores' workers run, by task timestamps as in
     row 3. Cost ratio = rate_empty / rate_full <= 1.5.
  P. process mode: N no-op ``mode="process"`` tasks drained by
     ``castor --workers 2`` against a warmed ``ProcessPoolExecutor(2)`` running the
     same function, both by task timestamps; castor's overhead per task is the
     difference of the wall time per task. Round-2 target castor >= 0.6x.
  7. producers: 4 producer processes on one fresh file (no worker) each open the
     file and make one warm-up call, then block reading a pipe that the bench
     closes once all 4 are ready, so they start together; each times every one
     of its N ``.delay()`` calls. 7a: the worst producer's slowest call (<= 50 ms);
     7b: the worst producer's p99 (<= 5 ms); 7c: aggregate rate = 4N / (last
     producer's end - release) against one producer alone doing the same N calls
     the same way, the two alternating, fresh files each time (>= 0.9x).
     7d (info): 7b's p99 against the same 4 producers each on a fresh file of its
     own (nothing shared), in the same alternation: the tail the machine's cores
     give 4 busy processes with no lock between them.
  8. scaling (info): N no-op thread tasks on one file drained by 2 workers
     ``--workers 1 --threads 2`` against 1 worker ``--threads 4``; also 3 and 4
     workers ``--threads 2`` in the notes. Every configuration's workers start
     first (a file each, all idle while another drains, warmed up by a few tasks)
     and the backlog is enqueued by ``.map`` (one transaction, all wake at once).
     The notes give the cores the workers kept busy (their CPU time / the drain's
     wall time): a rate that stops growing while cores stay free means the single
     SQLite writer is the limit.
  9. async: 9a/9b: N tasks that ``await asyncio.sleep(0.05)`` drained by
     ``castor --workers 1 --async-tasks 500`` against fewer (400) thread tasks
     that ``time.sleep(0.05)`` drained by ``castor --workers 2`` (the default
     ``--threads``, 2 x workers = 4), compared as rates; targets async >= 20x
     threads and >= 3,000 tasks/s. 9c (info): N no-op ``async def`` tasks
     (``--workers 1 --async-tasks 500``) against row 3's castor thread drain.
     Each drain starts its worker after the backlog, as in row 3; the three kinds
     alternate.
  pg. with ``--postgres`` (or only them with ``--postgres-only``): castor's
     PostgreSQL store against PgQueuer 1.6 on a throwaway local PostgreSQL 15
     (fsync on, synchronous_commit on; see pgbench.py for the server and for
     PgQueuer's settings), each side in fresh databases of its own, alternating:
     pg1 (info): N sequential ``.delay()`` against ``await queries.enqueue()``.
     pg2: ``.map`` of N against PgQueuer's batch enqueue of N; castor >= 20,000/s.
     pg3: drain of N no-op tasks by 2 worker processes per side, started after
     the backlog (castor 2 x ``--workers 1 --threads 4``; PgQueuer 2 x ``pgq run
     --batch-size 100``), by in-task timestamps, medians of 5 alternating
     rounds (3 in a quick run); castor >= 1x. The notes give
     WAL flushes and bytes per task (pg_stat_wal, pg_current_wal_lsn).
     pg4: both sides' idle workers up (castor ``--workers 1 --threads 4``,
     PgQueuer ``--batch-size 1``), N round trips in alternating blocks: castor
     ``.delay().join()``, PgQueuer enqueue then ``CompletionWatcher.wait_for``;
     p50 (castor <= 1x) and p99.
     pg5: then each side alone: its idle worker's CPU (castor < 2% of a core) and
     the whole cluster's (postmaster and every backend), over ``--idle`` s.

Exit status: 0 when every measurement ran (whatever the verdicts), 1 when one
could not be completed (its row says ERROR).
"""

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

if __name__ == "__main__":
    # pgbench.py imports this module as ``bench``: let it find this very one
    # (its workers list, its helpers), not a second copy.
    sys.modules.setdefault("bench", sys.modules[__name__])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # benchmark this checkout's castor.py

HUEY_FLAGS = ["-w", "4", "-k", "thread", "-d", "0.001", "-m", "0.05"]
CASTOR_FLAGS = ["--workers", "1", "--threads", "4"]

PRESETS = {
    #           default   quick
    "enqueue": (1000, 300),      # single .delay calls per repeat
    "map": (5000, 2000),         # items per .map call
    "drain": (5000, 1000),       # backlog drained by a freshly started worker
    "latency": (200, 50),        # sequential delay -> join round trips
    "idle": (10.0, 3.0),         # seconds of idle worker CPU sampling
    "full": (100_000, 20_000),   # finished tasks in the "full" store
    "store_enqueue": (1000, 300),
    "store_drain": (2000, 1000),
    "process": (1000, 200),      # no-op process tasks
    "producers": (4000, 1000),   # .delay calls per producer process
    "scaling": (5000, 1000),     # backlog per drain, each configuration of workers
    "async": (5000, 1000),       # async tasks (sleeping, and no-op)
    "async_thread": (400, 100),  # sleeping thread tasks (4 threads: ~80/s)
    "pg_enqueue": (1000, 300),   # PostgreSQL store: sequential .delay calls
    "pg_bulk": (5000, 2000),     # items per .map / PgQueuer batch enqueue
    "pg_drain": (5000, 1000),    # backlog drained by 2 worker processes
    "pg_latency": (200, 50),     # sequential round trips
    "repeats": (3, 2),
}

# Targets from SPEC section 8, some raised in round 2.
TARGET_ENQUEUE = 1.0     # castor/huey single enqueue rate >= 1x
TARGET_ENQUEUE_NOFSYNC = 1.0  # round 2: castor/huey-with-fsync=False single enqueue >= 1x
TARGET_MAP = 10.0        # castor .map rate / huey per-call rate >= 10x
TARGET_DRAIN_SPEC = 3.0  # SPEC: castor/huey drain rate >= 3x ...
TARGET_DRAIN = 5.0       # ... raised to 5x in round 2
TARGET_LATENCY = 0.2     # castor/huey p50 latency <= 0.2x
TARGET_IDLE = 2.0        # castor idle worker CPU < 2 % of a core
TARGET_STORE = 1.5       # rate_empty / rate_full <= 1.5
TARGET_PROCESS = 0.6     # round 2: castor process mode / ProcessPoolExecutor >= 0.6x
# Round 2, new rows.
PRODUCERS = 4                 # producer processes started together
TARGET_PRODUCER_MAX = 0.050   # worst producer's slowest .delay <= 50 ms
TARGET_PRODUCER_P99 = 0.005   # worst producer's p99 .delay <= 5 ms
TARGET_PRODUCER_RATE = 0.9    # aggregate rate / one producer alone >= 0.9x
TARGET_ASYNC_RATIO = 20.0     # sleeping async tasks / sleeping thread tasks >= 20x
TARGET_ASYNC_RATE = 3000.0    # sleeping async tasks >= 3,000/s


class BenchError(Exception):
    """A measurement that could not be completed (timeout, worker died...)."""


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Task modules written into each temporary directory ###########################

CASTOR_MODULE = '''
import os, time
from beaver import BeaverDB
from castor import Manager

HERE = os.path.dirname(os.path.abspath(__file__))
manager = Manager(BeaverDB(os.path.join(HERE, "castor.db")))

@manager.task(mode="thread")
def stamp():
    """No-op: returns when it ran."""
    return time.time()
'''

CASTOR_PROCESS_MODULE = '''
import os, time
from beaver import BeaverDB
from castor import Manager

HERE = os.path.dirname(os.path.abspath(__file__))
manager = Manager(BeaverDB(os.path.join(HERE, "castor.db")))

def plain_stamp():
    """The same no-op, undecorated, for ProcessPoolExecutor."""
    return time.time()

@manager.task(mode="process")
def pstamp():
    return time.time()
'''

HUEY_MODULE = '''
import os, time
from huey import SqliteHuey

HERE = os.path.dirname(os.path.abspath(__file__))
huey = SqliteHuey(filename=os.path.join(HERE, "huey.db"){extra})

@huey.task()
def stamp():
    """No-op: returns when it ran."""
    return time.time()
'''


def load_module(name, directory):
    """Import ``name`` fresh from ``directory`` (the worker imports it by that name)."""
    sys.modules.pop(name, None)
    importlib.invalidate_caches()
    sys.path.insert(0, directory)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(directory)


# Processes ####################################################################

_LIVE = []  # every Worker started and not yet stopped


def _proc_stat(pid):
    """Fields of /proc/PID/stat after the command name (index 0 is field 3)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].split()


def _descendants(root):
    """[(pid, starttime)] of every live descendant of ``root``."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = _proc_stat(int(entry))
                children.setdefault(int(fields[1]), []).append((int(entry), fields[19]))
    found, todo = [], [root]
    while todo:
        for pid, start in children.get(todo.pop(), ()):
            found.append((pid, start))
            todo.append(pid)
    return found


def tree_cpu_seconds(root):
    """CPU seconds used by ``root`` and its descendants, reaped ones included."""
    ticks = 0
    for pid in [root] + [pid for pid, _ in _descendants(root)]:
        with contextlib.suppress(OSError):
            fields = _proc_stat(pid)
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # u, s, cu, cs
    return ticks / os.sysconf("SC_CLK_TCK")


def child_env(cwd, extra=None):
    """The environment of a child process: this checkout's castor and ``cwd``
    importable, unbuffered output, and ``extra`` variables."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO, cwd] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


class Worker:
    """A worker subprocess in its own process group, always cleaned up."""

    def __init__(self, argv, cwd, log_path, label, env=None):
        self.label, self.log_path = label, log_path
        env = child_env(cwd, env)
        self._log = open(log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid
        _LIVE.append(self)

    def check_alive(self):
        if self.proc.poll() is not None:
            raise BenchError(f"{self.label} worker exited with {self.proc.returncode}; "
                             f"log tail:\n{self.log_tail()}")

    def log_tail(self, lines=15):
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        return ""

    def stop(self, grace=15.0):
        """SIGTERM the group, wait, then SIGKILL it and any stray descendant."""
        if self not in _LIVE:
            return
        _LIVE.remove(self)
        strays = _descendants(self.pid) if self.proc.poll() is None else []
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    log(f"{self.label} worker ignored SIGTERM for {grace:g}s; killing it")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            # Children in sessions of their own (castor's process pool) are
            # outside the group: kill those still alive, same pid and start time.
            for pid, start in strays:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if _proc_stat(pid)[19] == start:
                        os.kill(pid, signal.SIGKILL)
        finally:
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def log_file(work_dir, what):
    """A log path outside ``work_dir``: castor's worker watches its database's
    directory with inotify, so its own log lines there would wake it up."""
    logs = os.path.join(os.path.dirname(work_dir), "logs")
    os.makedirs(logs, exist_ok=True)
    return os.path.join(logs, f"{os.path.basename(work_dir)}-{what}-{time.monotonic_ns()}.log")


def stop_all_workers():
    for worker in list(_LIVE):
        with contextlib.suppress(Exception):
            worker.stop(grace=5)


def wait_until(predicate, timeout, what, worker=None, poll=0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if worker is not None:
            worker.check_alive()
        if time.monotonic() > deadline:
            tail = f"; {worker.label}'s log ends:\n{worker.log_tail(5)}" if worker else ""
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}{tail}")
        time.sleep(poll)


# The two systems behind one interface #########################################


class CastorSide:
    name = "castor"

    def __init__(self, root, tag, module_text=CASTOR_MODULE, module="benchtasks"):
        self.dir = tempfile.mkdtemp(prefix=f"castor-{tag}-", dir=root)
        self.module_name = module
        with open(os.path.join(self.dir, f"{module}.py"), "w") as f:
            f.write(module_text)
        self.mod = load_module(module, self.dir)
        self.manager = self.mod.manager
        self.manager.counts()  # open the connection and create the schema, untimed

    def command(self, flags=CASTOR_FLAGS):
        return [sys.executable, "-m", "castor", *flags, f"{self.module_name}:manager"]

    def worker(self, label="castor", flags=CASTOR_FLAGS):
        return Worker(self.command(flags), self.dir,
                      log_file(self.dir, "worker"), label)

    def enqueue_one(self, task=None):
        return (task or self.mod.stamp).delay()

    def enqueue_backlog(self, n, task=None):
        return (task or self.mod.stamp).map([()] * n)

    def finished(self):
        counts = self.manager.counts()
        return counts["success"] + counts["failed"] + counts["cancelled"]

    def unfinished(self):
        counts = self.manager.counts()
        return counts["pending"] + counts["running"]

    def results(self, handles):
        return [h.join(timeout=30) for h in handles]

    def round_trip(self, timeout):
        return self.mod.stamp.delay().join(timeout=timeout)

    def close(self):
        with contextlib.suppress(Exception):
            self.manager.db.close()


class HueySide:
    name = "huey"

    def __init__(self, root, tag, extra=""):
        self.dir = tempfile.mkdtemp(prefix=f"huey-{tag}-", dir=root)
        with open(os.path.join(self.dir, "benchhuey.py"), "w") as f:
            f.write(HUEY_MODULE.replace("{extra}", extra))
        self.mod = load_module("benchhuey", self.dir)
        self.huey = self.mod.huey

    @staticmethod
    def command():
        return [sys.executable, "-m", "huey.bin.huey_consumer", "benchhuey.huey", *HUEY_FLAGS]

    def worker(self, label="huey"):
        return Worker(self.command(), self.dir,
                      log_file(self.dir, "consumer"), label)

    def enqueue_one(self):
        return self.mod.stamp()

    def enqueue_backlog(self, n):
        return [self.mod.stamp() for _ in range(n)]  # no bulk API in huey

    def finished(self):
        return self.huey.storage.result_store_size()

    def results(self, handles):
        return [h.get(blocking=True, timeout=30, preserve=True) for h in handles]

    def round_trip(self, timeout):
        return self.mod.stamp().get(blocking=True, timeout=timeout)

    def close(self):
        with contextlib.suppress(Exception):
            self.huey.storage.close()


# Measurements #################################################################


def rate_of(n, fn):
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def measure_enqueue(side, n, repeats):
    side.enqueue_one()  # warm-up: connection, statements
    rates = [rate_of(n, lambda: [side.enqueue_one() for _ in range(n)]) for _ in range(repeats)]
    return statistics.median(rates)


def measure_map(side, n, repeats):
    side.enqueue_backlog(1)
    return statistics.median(rate_of(n, lambda: side.enqueue_backlog(n)) for _ in range(repeats))


def measure_castor_map(root, n, repeats):
    return measure_on(CastorSide(root, "map"), measure_map, n, repeats, "castor map")


def measure_huey_nofsync(root, n, repeats):
    """Informational: huey's enqueue with fsync=False (synchronous=OFF)."""
    side = HueySide(root, "nofsync", extra=", fsync=False")
    return measure_on(side, measure_enqueue, n, repeats, "huey enqueue, fsync=False")


def measure_on(side, measure, n, repeats, label):
    """One measurement on a side of its own, closed afterwards."""
    try:
        value = measure(side, n, repeats)
        log(f"{label}: {value:,.0f}/s")
        return value
    finally:
        side.close()


def stamp_rate(stamps):
    """Tasks per second between the first and the last task's own timestamp."""
    window = max(stamps) - min(stamps)
    if len(stamps) < 2 or window <= 0:
        raise BenchError("not enough tasks to time")
    return (len(stamps) - 1) / window


def measure_drain(side, n, task=None, **worker_kw):
    """Backlog of n with no worker, then start one: (rate by stamps, wall seconds).

    For castor, ``flags`` and ``task`` pick the worker's flags and the task."""
    before = side.finished()
    handles = side.enqueue_backlog(n, task) if task else side.enqueue_backlog(n)
    with side.worker(**worker_kw) as worker:
        wait_until(lambda: side.finished() >= before + n, max(60.0, n / 20), f"{n} tasks",
                   worker, poll=0.05)
        wall = time.monotonic() - worker.started
    return stamp_rate(side.results(handles)), wall


def measure_drains(side, n, repeats):
    """Median (rate, wall) of ``repeats`` drains, each by a freshly started worker."""
    runs = [measure_drain(side, n) for _ in range(repeats)]
    return (statistics.median(rate for rate, _ in runs),
            statistics.median(wall for _, wall in runs))


def measure_latency_and_idle(side, n, idle_seconds, warmups=5):
    """Round trips against an idle running worker, then its idle CPU:
    (p50, p99, CPU % of a core, slowest round trip)."""
    with side.worker() as worker:
        deadline = time.monotonic() + 60
        while True:  # the first round trip waits for the worker to be up
            worker.check_alive()
            try:
                side.round_trip(timeout=5)
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise BenchError(f"{side.name} worker never answered: {exc!r}") from None
        for _ in range(warmups):
            side.round_trip(timeout=30)
        latencies = []
        for _ in range(n):
            start = time.perf_counter()
            side.round_trip(timeout=30)
            latencies.append(time.perf_counter() - start)
        time.sleep(2.0)  # let back-offs settle
        worker.check_alive()
        cpu0, t0 = tree_cpu_seconds(worker.pid), time.monotonic()
        time.sleep(idle_seconds)
        worker.check_alive()
        cpu1, t1 = tree_cpu_seconds(worker.pid), time.monotonic()
    return (percentile(latencies, 50), percentile(latencies, 99),
            100.0 * (cpu1 - cpu0) / (t1 - t0), max(latencies))


def percentile(values, p):
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def fill_finished(side, n, chunk=5000):
    """Write n finished task documents through castor's public immediate mode."""
    from castor import Manager
    inline = Manager(side.manager.db, immediate=True)
    task = inline.task(mode="thread")(side.mod.stamp.func)  # same name: benchtasks.stamp
    for start in range(0, n, chunk):
        task.map([()] * min(chunk, n - start))
    counts = side.manager.counts()
    if counts["success"] < n:
        raise BenchError(f"fill wrote {counts['success']} finished tasks, wanted {n}")


def measure_store(root, full_n, enq_n, drain_n, repeats):
    """Castor's enqueue and drain rates on an empty store and a store of full_n.

    Both stores exist side by side and their measurements alternate, so a
    burst of load from elsewhere on the machine hits both alike. For the
    drains both workers run, one idling while the other drains.
    """
    sides = {}
    try:
        for label in ("empty", "full"):
            sides[label] = CastorSide(root, f"store-{label}")
        start = time.perf_counter()
        fill_finished(sides["full"], full_n)
        log(f"castor: wrote {full_n:,} finished tasks in {time.perf_counter() - start:.1f}s")
        out = {label: {"enqueue": [], "drain": [], "size_mb": os.path.getsize(
            os.path.join(side.dir, "castor.db")) / 1e6} for label, side in sides.items()}
        for side in sides.values():
            side.enqueue_one()  # warm-up
        for _ in range(repeats):
            for label, side in sides.items():
                out[label]["enqueue"].append(
                    rate_of(enq_n, lambda: [side.enqueue_one() for _ in range(enq_n)]))
        with contextlib.ExitStack() as stack:
            workers = {label: stack.enter_context(side.worker(label=f"castor ({label} store)"))
                       for label, side in sides.items()}
            for label, side in sides.items():  # the enqueue runs left a backlog
                wait_until(lambda: side.unfinished() == 0, 120, "the enqueue backlog",
                           workers[label])
            for _ in range(repeats):
                for label, side in sides.items():
                    handles = side.enqueue_backlog(drain_n)  # one transaction
                    # poll cheap counts, not every handle, while the worker drains
                    wait_until(lambda: side.unfinished() == 0, max(60.0, drain_n / 50),
                               f"{drain_n} tasks", workers[label])
                    out[label]["drain"].append(stamp_rate(side.results(handles)))
        for label, data in out.items():
            data["enqueue"] = statistics.median(data["enqueue"])
            data["drain"] = statistics.median(data["drain"])
            log(f"castor {label} store ({data['size_mb']:.1f} MB): enqueue "
                f"{data['enqueue']:,.0f}/s, drain {data['drain']:,.0f}/s")
        return out
    finally:
        for side in sides.values():
            side.close()


def measure_process(root, n, repeats):
    """Castor process mode (--workers 2) against ProcessPoolExecutor(2)."""
    side = CastorSide(root, "process", CASTOR_PROCESS_MODULE, module="benchproc")
    try:
        castor_rate, wall = measure_drain(side, n, task=side.mod.pstamp,
                                          label="castor (process)", flags=["--workers", "2"])
        plain = side.mod.plain_stamp
        rates = []
        with ProcessPoolExecutor(max_workers=2) as pool:
            list(pool.map(plain_call, [plain] * 8))  # warm: both processes up
            for _ in range(repeats):
                futures = [pool.submit(plain) for _ in range(n)]
                rates.append(stamp_rate([f.result(timeout=60) for f in futures]))
        return castor_rate, statistics.median(rates), wall
    finally:
        side.close()


def plain_call(fn):
    return fn()


# Concurrent producers ###########################################################

PRODUCER_SCRIPT = '''
"""Generated by bench.py: one producer process of the "producers" rows."""
import json, os, sys, time
import benchtasks

release_fd, n = int(sys.argv[1]), int(sys.argv[2])
benchtasks.manager.counts()   # open the file, untimed
benchtasks.stamp.delay()      # warm-up
print("ready", flush=True)
os.read(release_fd, 1)        # EOF when the parent closes the pipe: all start at once
durations = []
for _ in range(n):
    t0 = time.perf_counter()
    benchtasks.stamp.delay()
    durations.append(time.perf_counter() - t0)
json.dump({"end": time.monotonic(), "durations": durations}, sys.stdout)
'''


def run_producers(dirs, n, timeout=120.0):
    """One producer process in each of ``dirs`` (a directory given k times has
    k producers sharing its file), released together, each calling
    ``.delay()`` n times: [(end, durations)] and the release time."""
    release_r, release_w = os.pipe()
    procs, logs = [], []
    try:
        for i, where in enumerate(dirs):
            script = os.path.join(where, "producer.py")
            with open(script, "w") as f:
                f.write(PRODUCER_SCRIPT)
            logs.append(open(log_file(where, f"producer{i}"), "wb"))
            procs.append(subprocess.Popen(
                [sys.executable, script, str(release_r), str(n)], cwd=where,
                env=child_env(where), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=logs[-1], pass_fds=(release_r,), text=True))
        deadline = time.monotonic() + timeout
        for proc in procs:
            wait_for_line(proc, "ready", deadline)
        released = time.monotonic()
        os.close(release_w)
        release_w = None
        outs = [json.loads(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
                for proc in procs]
        return [(out["end"], out["durations"]) for out in outs], released
    finally:
        for fd in (release_r, release_w):
            if fd is not None:
                os.close(fd)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in logs:
            f.close()


def wait_for_line(proc, expected, deadline):
    """Read one line from ``proc``'s stdout before ``deadline``; it must be ``expected``."""
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
    line = proc.stdout.readline().strip() if ready else "(nothing: timed out)"
    if line != expected:
        raise BenchError(f"process {proc.pid} said {line!r}, not {expected!r} "
                         f"(exit status {proc.poll()})")


def producers_once(root, tag, count, n, apart=False):
    """One run on a fresh file shared by all, or (``apart``) on a fresh file
    each: worst max and p99 latency, aggregate rate."""
    sides = []
    try:
        for i in range(count if apart else 1):
            sides.append(CastorSide(root, f"{tag}-{i}"))
        dirs = [side.dir for side in sides] if apart else [sides[0].dir] * count
        outs, released = run_producers(dirs, n)
    finally:
        for side in sides:
            side.close()
            # Each file grew hundreds of MB of WAL: deleted now, the kernel drops
            # it instead of writing it back during the next run.
            shutil.rmtree(side.dir, ignore_errors=True)
    wall = max(end for end, _ in outs) - released
    return {"max": max(max(d) for _, d in outs),
            "p99": max(percentile(d, 99) for _, d in outs),
            "rate": count * n / wall}


def measure_producers(root, count, n, repeats):
    """``count`` producers on one file against one producer alone, and against
    ``count`` producers on a file each (nothing shared: what the machine's
    cores alone do to the tail), alternating; each figure is the median over
    ``repeats`` (fresh files every time)."""
    runs = {"one": [], "many": [], "apart": []}
    for i in range(repeats):
        runs["one"].append(producers_once(root, f"prod1-{i}", 1, n))
        runs["many"].append(producers_once(root, f"prod{count}-{i}", count, n))
        runs["apart"].append(producers_once(root, f"apart{count}-{i}", count, n, apart=True))
    out = {label: {key: statistics.median(r[key] for r in rs) for key in ("max", "p99", "rate")}
           for label, rs in runs.items()}
    out["worst_max"] = max(r["max"] for r in runs["many"])
    log(f"castor producers: {out}")
    return out


# Several workers on one file ####################################################

#: (label, worker processes, --threads each); the first is the row's peer.
SCALING = (("1x4", 1, 4), ("2x2", 2, 2), ("3x2", 3, 2), ("4x2", 4, 2))


def start_workers(stack, side, count, threads):
    """``count`` castor workers on side's file, registered and warmed up."""
    flags = ["--workers", "1", "--threads", str(threads)]
    workers = [stack.enter_context(side.worker(label=f"castor ({count}x{threads} #{i})",
                                               flags=flags)) for i in range(count)]
    wait_until(lambda: len(side.manager.workers()) >= count, 60, f"{count} workers up",
               workers[0])
    side.enqueue_backlog(20 * count)
    wait_until(lambda: side.unfinished() == 0, 60, "the warm-up tasks", workers[0])
    return workers


def drain_running(side, workers, n):
    """Enqueue n with ``.map`` while ``workers`` idle: (rate by stamps, CPU
    cores the workers kept busy from the commit until all were seen done)."""
    handles = side.enqueue_backlog(n)  # one transaction: every worker wakes at once
    cpu0, t0 = sum(tree_cpu_seconds(w.pid) for w in workers), time.monotonic()
    wait_until(lambda: side.unfinished() == 0, max(60.0, n / 20), f"{n} tasks", workers[0],
               poll=0.02)
    cores = (sum(tree_cpu_seconds(w.pid) for w in workers) - cpu0) / (time.monotonic() - t0)
    return stamp_rate(side.results(handles)), cores


def measure_scaling(root, n, repeats, configs=SCALING):
    """Drain rate of n no-op tasks by each configuration of workers, all
    started beforehand (one file each) and measured in turn, ``repeats`` times."""
    sides = {}
    try:
        with contextlib.ExitStack() as stack:
            workers = {}
            for label, count, threads in configs:
                sides[label] = CastorSide(root, f"scale-{label}")
                workers[label] = start_workers(stack, sides[label], count, threads)
            runs = {label: [] for label, _, _ in configs}
            for _ in range(repeats):
                for label, _, _ in configs:
                    runs[label].append(drain_running(sides[label], workers[label], n))
        out = {label: (statistics.median(r for r, _ in rs), statistics.median(c for _, c in rs))
               for label, rs in runs.items()}
        log(f"castor scaling: {out}")
        return out
    finally:
        for side in sides.values():
            side.close()


# Async tasks ####################################################################

CASTOR_ASYNC_MODULE = '''
import asyncio, os, time
from beaver import BeaverDB
from castor import Manager

HERE = os.path.dirname(os.path.abspath(__file__))
manager = Manager(BeaverDB(os.path.join(HERE, "castor.db")))

@manager.task(mode="async")
async def asleep():
    await asyncio.sleep(0.05)
    return time.time()

@manager.task(mode="thread")
def tsleep():
    time.sleep(0.05)
    return time.time()

@manager.task(mode="async")
async def astamp():
    return time.time()
'''

ASYNC_FLAGS = ["--workers", "1", "--async-tasks", "500"]
SLEEP_THREAD_FLAGS = ["--workers", "2"]  # castor's default --threads: 2 x workers = 4


def async_drain(root, tag, n, task_name, flags):
    """A drain on a fresh file of ``n`` of the async module's ``task_name``."""
    side = CastorSide(root, tag, CASTOR_ASYNC_MODULE, module="benchasync")
    try:
        rate, _ = measure_drain(side, n, task=getattr(side.mod, task_name), flags=flags,
                                label=f"castor ({task_name})")
        return rate
    finally:
        side.close()


def measure_async(root, n, n_thread, repeats):
    """Sleeping tasks, async against threads, and no-op async tasks, alternating;
    medians of ``repeats``."""
    runs = {"asleep": [], "tsleep": [], "astamp": []}
    for i in range(repeats):
        runs["asleep"].append(async_drain(root, f"asleep-{i}", n, "asleep", ASYNC_FLAGS))
        runs["tsleep"].append(async_drain(root, f"tsleep-{i}", n_thread, "tsleep",
                                          SLEEP_THREAD_FLAGS))
        runs["astamp"].append(async_drain(root, f"astamp-{i}", n, "astamp", ASYNC_FLAGS))
    out = {key: statistics.median(rates) for key, rates in runs.items()}
    log(f"castor async: {out}")
    return out


def profile_drain(root, n):
    """Drain n tasks with castor's worker under pyinstrument; the text report."""
    side = CastorSide(root, "profile")
    try:
        side.enqueue_backlog(n)
        report = os.path.join(side.dir, "profile.txt")
        prefix = [sys.executable, "-m", "pyinstrument", "-o", report]
        # pyinstrument runs ``castor.py`` as a script; same code path as -m castor.
        argv = [*prefix, os.path.join(REPO, "castor.py"), *CASTOR_FLAGS, "benchtasks:manager"]
        worker = Worker(argv, side.dir, log_file(side.dir, "profile-worker"),
                        "castor (pyinstrument)")
        with worker:
            wait_until(lambda: side.finished() >= n, max(60.0, n / 20), "profiled drain", worker)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM)  # graceful: pyinstrument writes
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=30)
        with open(report) as f:
            return f.read(), report
    finally:
        side.close()


# Table ########################################################################


def fmt_rate(x):
    return "-" if x is None else f"{x:,.0f}/s"


def fmt_ms(x):
    return "-" if x is None else f"{x * 1000:.2f} ms"


def verdict(ok):
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt_ratio(x, suffix="x"):
    return "-" if x is None else f"{x:.2f}{suffix}"


def print_table(rows):
    headers = ("#", "measure", "castor", "peer", "ratio", "target", "verdict")
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(line)


def error_row(num, what, target):
    return (num, what, "ERROR", "ERROR", "-", target, "ERROR")


# Rows #########################################################################
#
# One function per section: it turns ``results`` (None where a measurement
# failed) into table rows, and may add notes.


def rows_enqueue(results, cfg, notes):
    rows, c1, h1 = [], None, None
    if results.get("enqueue"):
        c1, h1 = results["enqueue"]
        x = ratio(c1, h1)
        rows.append(("1", f"enqueue, single .delay ({cfg['enqueue']:,} calls)", fmt_rate(c1),
                     fmt_rate(h1), fmt_ratio(x), f">= {TARGET_ENQUEUE:g}x",
                     verdict(x >= TARGET_ENQUEUE)))
    else:
        rows.append(error_row("1", "enqueue, single .delay", f">= {TARGET_ENQUEUE:g}x"))
    h1b = results.get("enqueue_nofsync")
    x = ratio(c1, h1b)
    rows.append(("1b", "  same, against huey with fsync=False (sync OFF)", fmt_rate(c1),
                 fmt_rate(h1b) if h1b else "ERROR", fmt_ratio(x),
                 f">= {TARGET_ENQUEUE_NOFSYNC:g}x",
                 "ERROR" if x is None else verdict(x >= TARGET_ENQUEUE_NOFSYNC)))
    c2 = results.get("map")
    x = ratio(c2, h1)
    rows.append(("2", f"enqueue, castor .map of {cfg['map']:,} vs huey per-call*",
                 fmt_rate(c2) if c2 else "ERROR", fmt_rate(h1), fmt_ratio(x),
                 f">= {TARGET_MAP:g}x", "ERROR" if x is None else verdict(x >= TARGET_MAP)))
    return rows


def rows_drain(results, cfg, notes):
    target = f">= {TARGET_DRAIN:g}x"
    if not results.get("drain"):
        return [error_row("3", "drain", target)]
    (c3, cwall), (h3, hwall) = results["drain"]
    x = ratio(c3, h3)
    notes.append(f"row 3 wall time from spawning the worker until all {cfg['drain']:,} were "
                 f"seen finished (start-up included): castor {cwall:.2f}s "
                 f"({cfg['drain'] / cwall:,.0f}/s), huey {hwall:.2f}s "
                 f"({cfg['drain'] / hwall:,.0f}/s); SPEC section 8 asks >= "
                 f"{TARGET_DRAIN_SPEC:g}x, the round-2 target is {TARGET_DRAIN:g}x")
    return [("3", f"drain {cfg['drain']:,} no-op thread tasks, 4 threads", fmt_rate(c3),
             fmt_rate(h3), fmt_ratio(x), target, verdict(x >= TARGET_DRAIN))]


def rows_latency(results, cfg, notes):
    if not results.get("latency"):
        return [error_row("4", "latency", f"<= {TARGET_LATENCY:g}x"),
                error_row("5", "idle CPU", f"< {TARGET_IDLE:g}%")]
    (cp50, cp99, ccpu, cmax), (hp50, hp99, hcpu, hmax) = results["latency"]
    x = ratio(cp50, hp50)
    notes.append(f"row 4 slowest round trip: castor {fmt_ms(cmax)}, huey {fmt_ms(hmax)}")
    notes.append(f"row 5 resolution: one clock tick (1/{os.sysconf('SC_CLK_TCK')} s) over "
                 f"{cfg['idle']:g}s is {100 / os.sysconf('SC_CLK_TCK') / cfg['idle']:.2f}% "
                 "of a core")
    return [("4a", f"latency delay->result p50 ({cfg['latency']} seq.)", fmt_ms(cp50),
             fmt_ms(hp50), fmt_ratio(x), f"<= {TARGET_LATENCY:g}x", verdict(x <= TARGET_LATENCY)),
            ("4b", "latency delay->result p99", fmt_ms(cp99), fmt_ms(hp99),
             fmt_ratio(ratio(cp99, hp99)), "-", "n/a"),
            ("5", f"idle worker CPU over {cfg['idle']:g}s, % of a core", f"{ccpu:.2f}%",
             f"{hcpu:.2f}%", fmt_ratio(ratio(ccpu, hcpu)), f"castor < {TARGET_IDLE:g}%",
             verdict(ccpu < TARGET_IDLE))]


def rows_store(results, cfg, notes):
    store, target = results.get("store"), f"<= {TARGET_STORE:g}x cost"
    if not store:
        return [error_row("6", "100k finished vs empty store", target)]
    rows, e, f = [], store["empty"], store["full"]
    for sub, key, what in (("6a", "enqueue", "enqueue .delay"),
                           ("6b", "drain", "drain (claim+finish)")):
        x = ratio(e[key], f[key])
        rows.append((sub, f"{what}, {cfg['full']:,} finished vs empty store",
                     f"{fmt_rate(f[key])} (empty {fmt_rate(e[key])})", "not run",
                     fmt_ratio(x, "x cost"), target, verdict(x <= TARGET_STORE)))
    notes.append(f"row 6 store file: {f['size_mb']:.1f} MB with {cfg['full']:,} finished "
                 f"tasks; drain batches of {cfg['store_drain']:,} enqueued by .map while both "
                 "stores' workers run, rate by task timestamps; empty and full measured "
                 "alternately")
    return rows


def rows_process(results, cfg, notes):
    target = f">= {TARGET_PROCESS:g}x"
    if not results.get("process"):
        return [error_row("P", "process mode vs ProcessPoolExecutor", target)]
    crate, prate, _wall = results["process"]
    x = ratio(crate, prate)
    overhead_ms = 1000 * (1 / crate - 1 / prate)
    notes.append(f"row P peer: a warm ProcessPoolExecutor(2) running the same no-op; castor's "
                 f"overhead is {overhead_ms:.2f} ms of wall time per task with 2 processes "
                 f"({2 * overhead_ms:.2f} ms per task per process)")
    return [("P", f"process mode {cfg['process']:,} no-op, 2 procs (peer: "
             "ProcessPoolExecutor)", fmt_rate(crate), fmt_rate(prate), fmt_ratio(x), target,
             verdict(x >= TARGET_PROCESS))]


def rows_producers(results, cfg, notes):
    k, n = PRODUCERS, cfg["producers"]
    targets = (f"<= {TARGET_PRODUCER_MAX * 1000:g} ms", f"<= {TARGET_PRODUCER_P99 * 1000:g} ms",
               f">= {TARGET_PRODUCER_RATE:g}x")
    prod = results.get("producers")
    if not prod:
        return [error_row(num, f"{k} producers", t)
                for num, t in zip(("7a", "7b", "7c", "7d"), (*targets, "-"))]
    many, one, apart = prod["many"], prod["one"], prod["apart"]
    notes.append(f"rows 7a-7c peer: one producer alone making the same {n:,} calls, "
                 f"alternating with the {k}-producer runs, a fresh file for each; medians of "
                 f"{cfg['repeats']}; the worst single call over all {k}-producer runs took "
                 f"{prod['worst_max'] * 1000:.2f} ms")
    notes.append(f"row 7d peer: the same {k} producers each on a file of its own, nothing "
                 f"shared, in the same alternation: worst p99 {fmt_ms(apart['p99'])}, slowest "
                 f"call {fmt_ms(apart['max'])}, aggregate {fmt_rate(apart['rate'])}, on "
                 f"{os.cpu_count()} CPUs. A tail that stays there without a shared file is "
                 "the machine's: a call whose process the scheduler preempts waits for a "
                 "time slice")
    return [("7a", f"{k} producers x {n:,} .delay, one file: worst max call", fmt_ms(many["max"]),
             fmt_ms(one["max"]), fmt_ratio(ratio(many["max"], one["max"])), targets[0],
             verdict(many["max"] <= TARGET_PRODUCER_MAX)),
            ("7b", "  same, worst producer's p99 call", fmt_ms(many["p99"]), fmt_ms(one["p99"]),
             fmt_ratio(ratio(many["p99"], one["p99"])), targets[1],
             verdict(many["p99"] <= TARGET_PRODUCER_P99)),
            ("7c", "  same, aggregate rate (peer: 1 producer)", fmt_rate(many["rate"]),
             fmt_rate(one["rate"]), fmt_ratio(ratio(many["rate"], one["rate"])), targets[2],
             verdict(ratio(many["rate"], one["rate"]) >= TARGET_PRODUCER_RATE)),
            ("7d", f"  same p99 (peer: {k} producers, a file each; info)", fmt_ms(many["p99"]),
             fmt_ms(apart["p99"]), fmt_ratio(ratio(many["p99"], apart["p99"])), "-", "n/a")]


def rows_scaling(results, cfg, notes):
    scale = results.get("scaling")
    if not scale:
        return [error_row("8", "scaling", "-")]
    (peer, _, peer_threads), (label, count, threads) = SCALING[0], SCALING[1]
    notes.append("row 8 peer: 1 worker --threads 4. Workers started first (one file per "
                 "configuration, all idle while another drains), then the backlog enqueued "
                 "by .map; rate by task timestamps. Workers x threads each: " + ", ".join(
                     f"{lab} {fmt_rate(rate)} ({cores:.2f} cores busy)"
                     for lab, (rate, cores) in scale.items())
                 + f"; {os.cpu_count()} CPUs. Cores busy = the workers' CPU time / drain wall "
                 "time: a rate that stops growing while cores stay free means the single "
                 "SQLite writer (one write lock) is the limit")
    return [("8", f"drain {cfg['scaling']:,} no-op, {count} workers x --threads {threads} "
             f"(peer: 1 x {peer_threads}; info)", fmt_rate(scale[label][0]),
             fmt_rate(scale[peer][0]), fmt_ratio(ratio(scale[label][0], scale[peer][0])),
             "-", "n/a")]


def rows_async(results, cfg, notes):
    res = results.get("async")
    targets = (f">= {TARGET_ASYNC_RATIO:g}x", f">= {TARGET_ASYNC_RATE:,.0f}/s")
    if not res:
        return [error_row("9a", "async sleep vs threads", targets[0]),
                error_row("9b", "async sleep rate", targets[1]),
                error_row("9c", "async no-op drain", "-")]
    a, t, s = res["asleep"], res["tsleep"], res["astamp"]
    x = ratio(a, t)
    row3 = results["drain"][0][0] if results.get("drain") else None
    notes.append(f"rows 9a-9b: {cfg['async']:,} tasks awaiting asyncio.sleep(0.05), castor "
                 f"{' '.join(ASYNC_FLAGS)}; peer: {cfg['async_thread']:,} tasks calling "
                 f"time.sleep(0.05), castor {' '.join(SLEEP_THREAD_FLAGS)} (4 threads); row 9c "
                 f"peer: row 3's castor thread drain; rates by task timestamps, medians of "
                 f"{cfg['repeats']}")
    return [("9a", "sleep 50 ms tasks: async (500 at once) vs 4 threads", fmt_rate(a),
             fmt_rate(t), fmt_ratio(x), targets[0], verdict(x >= TARGET_ASYNC_RATIO)),
            ("9b", "  same, async rate", fmt_rate(a), "-", "-", targets[1],
             verdict(a >= TARGET_ASYNC_RATE)),
            ("9c", f"drain {cfg['async']:,} no-op async tasks (peer: row 3; info)", fmt_rate(s),
             fmt_rate(row3), fmt_ratio(ratio(s, row3)), "-", "n/a")]


SQLITE_ROWS = (rows_enqueue, rows_drain, rows_latency, rows_store, rows_process,
               rows_producers, rows_scaling, rows_async)


# Main #########################################################################


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    parser.add_argument("--tasks", type=int, help="drain backlog size (row 3)")
    parser.add_argument("--full", type=int, help="finished tasks in the full store (row 6)")
    parser.add_argument("--repeats", type=int, help="repeats of small measurements")
    parser.add_argument("--idle", type=float, help="seconds of idle CPU sampling (rows 5, pg5)")
    parser.add_argument("--no-process", action="store_true", help="skip row P")
    parser.add_argument("--no-store", action="store_true", help="skip row 6")
    parser.add_argument("--postgres", action="store_true",
                        help="also castor's PostgreSQL store against PgQueuer (rows pg1-pg5) "
                        "on a throwaway PostgreSQL 15 server (run as root)")
    parser.add_argument("--postgres-only", action="store_true",
                        help="only the PostgreSQL rows")
    parser.add_argument("--profile", action="store_true",
                        help="also profile castor's worker draining a backlog (pyinstrument)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.postgres = args.postgres or args.postgres_only
    preset = {k: v[1 if args.quick else 0] for k, v in PRESETS.items()}
    for key, value in (("drain", args.tasks), ("full", args.full),
                       ("repeats", args.repeats), ("idle", args.idle)):
        if value is not None:
            preset[key] = value
    if preset["drain"] < 2 or preset["repeats"] < 1:
        parser.error("--tasks must be >= 2 and --repeats >= 1")
    return args, preset


def measure_sqlite(args, cfg, root, attempt):
    """Every measurement on the beaver file (rows 1-9), castor against its peers."""
    def each(tag, measure):
        """Run ``measure(side)`` on castor then huey, each in a fresh directory."""
        out = []
        for cls in (CastorSide, HueySide):
            side = cls(root, tag)
            try:
                value = measure(side)
                log(f"{side.name} {tag}: {value}")
                out.append(value)
            finally:
                side.close()
        return out

    r = cfg["repeats"]
    attempt("enqueue", lambda: each("enqueue", lambda s: measure_enqueue(s, cfg["enqueue"], r)))
    attempt("enqueue_nofsync", lambda: measure_huey_nofsync(root, cfg["enqueue"], r))
    attempt("map", lambda: measure_castor_map(root, cfg["map"], r))
    attempt("drain", lambda: each("drain", lambda s: measure_drains(s, cfg["drain"], r)))
    attempt("latency", lambda: each("latency", lambda s: measure_latency_and_idle(
        s, cfg["latency"], cfg["idle"])))
    if not args.no_store:
        attempt("store", lambda: measure_store(root, cfg["full"], cfg["store_enqueue"],
                                               cfg["store_drain"], r))
    if not args.no_process:
        attempt("process", lambda: measure_process(root, cfg["process"], r))
    attempt("producers", lambda: measure_producers(root, PRODUCERS, cfg["producers"], r))
    attempt("scaling", lambda: measure_scaling(root, cfg["scaling"], r))
    attempt("async", lambda: measure_async(root, cfg["async"], cfg["async_thread"], r))
    if args.profile:
        attempt("profile", lambda: profile_drain(root, cfg["drain"]))


def run(args, cfg, root):
    results, rows, notes = {}, [], []

    def attempt(key, fn):
        try:
            results[key] = fn()
        except Exception as exc:  # one failed measurement must not sink the rest
            results[key] = None
            log(f"{key} FAILED: {exc}")
            notes.append(f"{key}: ERROR {type(exc).__name__}: {exc}")

    if not args.postgres_only:
        measure_sqlite(args, cfg, root, attempt)
        skipped = {rows_store: args.no_store, rows_process: args.no_process}
        for build in SQLITE_ROWS:
            if not skipped.get(build):
                rows += build(results, cfg, notes)
    if args.postgres:
        import pgbench
        pgbench.measure(cfg, root, attempt)
        rows += pgbench.rows(results, cfg, notes)
    return rows, notes, results


def load_average():
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "?"


def castor_digest():
    with open(os.path.join(REPO, "castor.py"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def print_header(args, cfg, began, load_before, digest):
    import castor
    print()
    print(f"castor {castor.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} "
          f"CPUs{' (--quick)' if args.quick else ''}, {time.monotonic() - began:.0f}s; "
          f"castor.py sha256 {digest}")
    print(f"load average before {load_before}, after {load_average()} (other work on the "
          "machine skews the figures)")
    if not args.postgres_only:
        import huey
        print("castor worker: castor " + " ".join(CASTOR_FLAGS) + " benchtasks:manager "
              "(unless the row says otherwise)")
        print(f"huey {huey.__version__} worker: huey_consumer benchhuey.huey "
              + " ".join(HUEY_FLAGS) + "  (SqliteHuey(filename=...), other settings default)")
    print("ratio = castor / peer (rates: higher is better; latency: lower is better); "
          "row 6 ratio = rate_empty / rate_full (cost). The peer is huey's SqliteHuey for "
          "rows 1-5, and what the row names otherwise (see the notes)")


def print_footer(args, cfg, notes, results):
    if not args.postgres_only:
        print("Huey's default fsync=None leaves SQLite at synchronous=FULL (a WAL sync per "
              "commit); castor runs synchronous=NORMAL.\nRow 1b compares with huey without "
              "syncs (synchronous=OFF, less durable than either).")
        print("* huey has no bulk enqueue API: row 2 compares castor's .map with huey's "
              "per-call enqueue (row 1).")
    print(f"Rates are medians of {cfg['repeats']} runs where repeated; drain rates are "
          "(N-1) / (last task's timestamp - first task's), which excludes interpreter start-up.")
    for note in notes:
        print(f"- {note}")
    if results.get("profile"):
        text, _path = results["profile"]
        print(f"\npyinstrument profile of castor's worker draining {cfg['drain']:,} tasks "
              f"(first 60 lines):")
        print("\n".join(text.splitlines()[:60]))


def main(argv=None):
    args, cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    import castor
    root = tempfile.mkdtemp(prefix="castor-bench-")
    began = time.monotonic()
    load_before, digest = load_average(), castor_digest()
    log(f"castor {castor.__version__} from {castor.__file__}; python "
        f"{sys.version.split()[0]}; {os.cpu_count()} CPUs; temp dir {root}")
    try:
        rows, notes, results = run(args, cfg, root)
    finally:
        stop_all_workers()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print_header(args, cfg, began, load_before, digest)
    print_table(rows)
    print_footer(args, cfg, notes, results)
    return 1 if any(row[-1] == "ERROR" for row in rows) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # workers and server already stopped by the finally blocks
        print("interrupted", file=sys.stderr)
        sys.exit(130)
