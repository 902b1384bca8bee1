# Sourced by the integration scripts (integration/*.sh): PASS/FAIL bookkeeping and the checks of
# what a script needs. A script whose needs are not met fails with the reason; it never skips.

failures=0
pass() { echo "PASS: $*"; }
fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}
# check NAME COMMAND...: PASS if the command succeeds.
check() {
    local name=$1
    shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}

# need_root WHY: fail unless running as uid 0.
need_root() {
    (($(id -u) == 0)) || {
        echo "FAIL: needs root ($1); use sudo -E integration/run $(basename "$0" .sh)"
        exit 1
    }
}

# need_tools TOOL...: fail unless every tool is on PATH.
need_tools() {
    local tool
    for tool; do
        command -v "$tool" >/dev/null || {
            echo "FAIL: $tool is not installed"
            exit 1
        }
    done
}

# need_trustline: fail unless $TRUSTLINE is an executable.
need_trustline() {
    [[ -x $TRUSTLINE ]] || {
        echo "FAIL: no trustline binary at $TRUSTLINE (cargo build, or set TRUSTLINE)"
        exit 1
    }
}
