import asyncio
import time
# Import the manager instance from your main application file
from main import manager

@manager.task(mode='process')
def complex_calculation(a, b):
    time.sleep(2)
    return a + b


@manager.task(mode='async', timeout=5)
async def fetch_status(url):
    """An I/O-bound task: the worker runs many of these at once on its event loop.
    (A stand-in for an HTTP call, so the example needs no network.)"""
    await asyncio.sleep(0.2)
    return {"url": url, "status": 200}
