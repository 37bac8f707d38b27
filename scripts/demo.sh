#!/usr/bin/env bash
# Set up .venv, start a worker on examples/quickstart, run the app, stop the worker.
EXTRAS= source "$(dirname "$0")/venv.sh"
root=$PWD
cd examples/quickstart
rm -f tasks.db tasks.db-wal tasks.db-shm
"$root/.venv/bin/castor" main:manager &
worker=$!
trap 'kill -INT $worker 2>/dev/null; wait $worker' EXIT
"$root/.venv/bin/python" main.py
