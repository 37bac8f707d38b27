#!/usr/bin/env bash
# Set up .venv and run the test suite. As root on Debian it also installs what
# the tests need from the system (a PostgreSQL server, Chromium, iproute2);
# elsewhere those tests skip and say why (under CI they fail instead).
EXTRAS=test source "$(dirname "$0")/venv.sh"
source scripts/provision.sh
exec .venv/bin/python -m pytest "$@"
