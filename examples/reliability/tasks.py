"""Tasks for demo.py: each run is appended to runs.log, so re-runs show."""
import os
import time

from beaver import BeaverDB
from castor import Manager

HERE = os.path.dirname(os.path.abspath(__file__))
manager = Manager(BeaverDB(os.path.join(HERE, "demo.db")))


def _mark(text):
    with open(os.path.join(HERE, "runs.log"), "a") as fh:
        fh.write(text + "\n")


@manager.task(mode="thread")
def work(n):
    _mark(f"start {n}")
    time.sleep(0.02)
    return n * n


@manager.task(mode="process")
def critical_report(seconds):
    """A critical (daemon=False) process task: shutdown waits for it."""
    time.sleep(seconds)
    return "report done"


@manager.task(mode="process", daemon=True)
def background_scan(seconds):
    """A daemon task: terminated at once when the worker shuts down."""
    time.sleep(seconds)
    return "scan done"
