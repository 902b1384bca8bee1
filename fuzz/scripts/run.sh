#!/usr/bin/env bash
# Runs fuzz targets one after another with the options of FUZZING.md.
#   fuzz/scripts/run.sh SECONDS [RUNS] [TARGET...]
# SECONDS bounds each target's run (-max_total_time), RUNS its executions (-runs, default
# unbounded; -1 for unbounded with targets named). Seeds are read from fuzz/corpus/TARGET and
# fuzz/regressions/TARGET (inputs that once failed); what the run finds is kept in
# fuzz/corpus-grown/TARGET (not committed); a crash is written to fuzz/artifacts/TARGET/ and
# makes the script fail. Build first: cargo +nightly fuzz build --sanitizer none --debug-assertions
set -euo pipefail
cd "$(dirname "$0")/.."
secs=$1
runs=${2:--1}
shift 2 || shift $#
# cargo fuzz builds into CARGO_TARGET_DIR when it is set, else fuzz/target.
bin=${FUZZ_BIN:-${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release}
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^trustline-fuzz$')
fi
max_len() {
    case $1 in
        spiffe_id) echo 512 ;;
        stream_header) echo 1024 ;;
        path_normalise) echo 2048 ;;
        revoked_list | csr | cert_inspect | policy_suggest) echo 8192 ;;
        *) echo 16384 ;;
    esac
}
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus-grown/$t" "artifacts/$t"
    echo "=== fuzz $t: ${secs}s, runs $runs ($(date -u +%H:%M:%S))"
    rc=0
    # Inputs that once crashed a target are replayed first with its seeds.
    dirs=("corpus-grown/$t" "corpus/$t")
    [[ -d "regressions/$t" ]] && dirs+=("regressions/$t")
    "$bin/$t" "${dirs[@]}" \
        -runs="$runs" -max_total_time="$secs" -max_len="$(max_len "$t")" \
        -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" >"artifacts/$t.log" 2>&1 &
    pid=$!
    wait $pid || rc=$?
    # The config and CSR targets' CA directory (fuzz_targets/common).
    rm -rf "/dev/shm/trustline-fuzz-$pid" "${TMPDIR:-/tmp}/trustline-fuzz-$pid"
    grep -E '^#[0-9]+ +(INITED|DONE)|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|^Done|^==[0-9]+==|^SUMMARY|panicked' "artifacts/$t.log" || true
    if [[ $rc -ne 0 ]]; then
        echo "=== fuzz $t: FAILED with status $rc (fuzz/artifacts/$t.log, fuzz/artifacts/$t/)"
        tail -30 "artifacts/$t.log"
        failed=1
    fi
done
exit $failed
