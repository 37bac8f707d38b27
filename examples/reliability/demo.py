"""Castor's reliability, shown with real processes and real signals.

    python examples/reliability/demo.py

1. A worker drains 300 tasks and is killed with kill -9 (its pool children
   too) half way; a new worker starts; all 300 succeed, each exactly once
   more if the kill interrupted it (the tasks the worker had claimed but not
   yet started simply run once).
2. Ctrl+C (SIGINT to the worker's process group, as a terminal sends it)
   while a critical process task and a daemon task run: the critical task
   finishes, the daemon task is terminated, the worker exits 0.
"""
import collections
import glob
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
for path in glob.glob(os.path.join(HERE, "demo.db*")) + glob.glob(os.path.join(HERE, "runs.log")):
    os.remove(path)

import tasks  # noqa: E402  (after the cleanup: it opens demo.db)


def start_worker():
    return subprocess.Popen([sys.executable, "-m", "castor", "--workers", "2", "--threads", "4",
                             "tasks:manager"], cwd=HERE, start_new_session=True,
                            stderr=open(os.path.join(HERE, "worker.log"), "a"))


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.05)


def starts():
    try:
        with open(os.path.join(HERE, "runs.log")) as fh:
            return collections.Counter(line.split()[1] for line in fh)
    except FileNotFoundError:
        return collections.Counter()


print("== 1. kill -9 in the middle of a drain of 300 tasks")
handles = tasks.work.map(range(300))
worker = start_worker()
wait_for(lambda: sum(starts().values()) >= 120)
subprocess.run(["pkill", "-9", "-s", str(worker.pid)])  # the worker and its pool children
worker.wait()
running = [h for h in handles if h.status() == "running"]  # as the kill left them
begun = starts()  # of those, the ones that had started (the rest waited for a thread)
started = sorted(n for n in (str(h.info()["args"][0]) for h in running) if begun[n])
print(f"killed worker {worker.pid} (signal {-worker.returncode}) with "
      f"{sum(1 for h in handles if h.status() == 'success')} done and {len(running)} claimed "
      f"({len(started)} of them started):", ", ".join(h.id[:8] for h in running))
worker = start_worker()
results = [h.join(timeout=60) for h in handles]
assert results == [n * n for n in range(300)]
counts = starts()
rerun = sorted(n for n, c in counts.items() if c > 1)
print(f"restarted as {worker.pid}: {sum(h.status() == 'success' for h in handles)}/300 success;"
      f" re-run: tasks {rerun} (the {len(started)} interrupted ones: {started == rerun})")
print("losses recorded:", {h.id[:8]: h.info()["losses"] for h in running})

print("\n== 2. Ctrl+C with a critical process task and a daemon task running")
report = tasks.critical_report.delay(3)
scan = tasks.background_scan.delay(60)
wait_for(lambda: report.status() == "running" and scan.status() == "running")
time.sleep(0.5)
os.killpg(worker.pid, signal.SIGINT)  # what a terminal's Ctrl+C does
signalled = time.monotonic()
worker.wait(timeout=30)
print(f"worker exited {worker.returncode} after {time.monotonic() - signalled:.1f}s")
print("critical_report:", report.status(), "->", report.join(timeout=1))
try:
    scan.join(timeout=1)
except Exception as exc:
    print("background_scan:", scan.status(), "->", type(exc).__name__, str(exc).splitlines()[0])
left = subprocess.run(["pgrep", "-f", "castor._child_main"], capture_output=True, text=True).stdout
print("pool children left:", left.split() or "none")
