#!/usr/bin/env bash
# Set up .venv and run the test suite.
EXTRAS=test source "$(dirname "$0")/venv.sh"
exec .venv/bin/python -m pytest "$@"
