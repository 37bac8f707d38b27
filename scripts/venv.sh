# Sourced by the other scripts: make .venv (Python >= 3.12) and install castor
# with the extras in $EXTRAS (none if empty).
set -eu
cd "$(dirname "$0")/.."
find_python() {
    for py in python python3 python3.13 python3.12; do
        if command -v "$py" >/dev/null 2>&1 &&
           "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    echo "castor needs Python 3.12 or newer (beaver-db does); none found" >&2
    return 1
}
if [ ! -x .venv/bin/python ]; then
    "$(find_python)" -m venv .venv
fi
spec="."
[ -n "${EXTRAS:-}" ] && spec=".[${EXTRAS}]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
