#!/usr/bin/env bash
# Rotation under outside load, bounded for CI (about 1 min): two runs of 20 s of
# benches/chaos/rotation-under-load.sh (real CA with 6 s SVIDs, two sidecars, nginx, oha with
# keep-alive and with a new connection per request). Fails on any failed request, keep-alive or
# new connection, and on any non-200 answer: pooled sessions are re-authenticated across
# rotations, so no long-lived connection is cut at its first certificate's expiry (RELIABILITY.md,
# "Rotation under outside load"). The long form (ROUNDS=20 DURATION=30s) is the figure.
#
# requires: oha nginx curl jq python3
#
# Usage: TRUSTLINE=target/debug/trustline integration/chaos_rotation.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export TRUSTLINE=${TRUSTLINE:-target/debug/trustline}
[[ $TRUSTLINE == /* ]] || TRUSTLINE=$PWD/$TRUSTLINE
ROUNDS=${ROUNDS:-2} DURATION=${DURATION:-20s} KEEPALIVE_CUTS=fail \
    exec "$here/../benches/chaos/rotation-under-load.sh"
