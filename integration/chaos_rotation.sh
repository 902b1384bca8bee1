#!/usr/bin/env bash
# Rotation under outside load, bounded for CI (about 1 min): two runs of 20 s of
# benches/chaos/rotation-under-load.sh (real CA with 6 s SVIDs, two sidecars, nginx, oha with
# keep-alive and with a new connection per request). Fails on any failed request on a new
# connection and any non-200 answer. Keep-alive requests cut when a session's certificate
# expires are reported, not failed: that cut is by design today (RELIABILITY.md, "Rotation under
# outside load"); the long form (ROUNDS=20 DURATION=30s, KEEPALIVE_CUTS=fail) is the figure.
#
# requires: oha nginx curl jq python3
#
# Usage: TRUSTLINE=target/debug/trustline integration/chaos_rotation.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export TRUSTLINE=${TRUSTLINE:-target/debug/trustline}
[[ $TRUSTLINE == /* ]] || TRUSTLINE=$PWD/$TRUSTLINE
ROUNDS=${ROUNDS:-2} DURATION=${DURATION:-20s} KEEPALIVE_CUTS=allow \
    exec "$here/../benches/chaos/rotation-under-load.sh"
