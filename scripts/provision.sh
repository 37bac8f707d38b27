# provision.sh: system packages castor's tests need (source it from scripts/test.sh,
# or run it with bash).  Idempotent and quiet: it does nothing when everything is there,
# and prints apt's output only if apt fails.  As non-root it only says what is missing.
#   - a PostgreSQL server (any /usr/lib/postgresql/*/bin/initdb), else apt `postgresql`
#   - `ip` (iproute2), for the network-namespace tests
#   - Debian `chromium`, if no `chromium` on PATH
castor_provision() {
    local need=() log rc
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
    command -v ip >/dev/null 2>&1 || need+=(iproute2)
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    [ "${#need[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "provision: not root, not installing: ${need[*]} (tests needing them will skip)" >&2
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "provision: no apt-get, cannot install: ${need[*]}" >&2
        return 0
    fi
    echo "provision: apt-get install ${need[*]}" >&2
    log="$(mktemp)"
    # policy-rc.d / no systemd: the postgresql package's own cluster is not started;
    # the tests run their own throwaway server on a free port anyway.
    if DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1 &&
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >>"$log" 2>&1; then
        rc=0
    else
        rc=$?
        echo "provision: apt-get failed ($rc):" >&2
        tail -n 40 "$log" >&2
    fi
    rm -f "$log"
    return "$rc"
}
castor_provision
