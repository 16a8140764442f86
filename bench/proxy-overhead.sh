#!/usr/bin/env bash
# Proxy overhead benchmark (issue 4, DESIGN §8). Not a test: it measures.
#
# Latency through the gateway minus latency calling the same local upstream
# directly, p50 and p99, at fixed request rates, with N WebSocket event
# subscribers attached; then checks that no ledger row and no event was lost.
#
#   bash bench/proxy-overhead.sh
#   RATES="500 2000" DURATION=15 ROUNDS=3 SUBSCRIBERS=100 bash bench/proxy-overhead.sh
#
# Environment knobs (defaults in brackets):
#   RATES [500 2000]     requests/s, one oha run per target per rate
#   DURATION [15]        seconds per measured run
#   WARMUP [3]           seconds of unmeasured load before each measured run
#   ROUNDS [1]           repeat every (rate, direct, gateway) measurement
#   SUBSCRIBERS [100]    WebSocket subscribers (admin key: they see every event)
#   CONNECTIONS [50]     oha -c
#   OHA_THREADS [1]      oha --worker-threads (leave the cores to the gateway)
#   UPSTREAM_THREADS [1] worker threads of the upstream
#   SUBSCRIBER_NICE [0]  nice level of the subscriber process (19: it yields the
#                        cores to the gateway, roughly as if it ran elsewhere)
#   SUBSCRIBER_SCHED [other]  scheduling policy of the subscriber process, as
#                        chrt names it (idle: SCHED_IDLE, it runs only on a
#                        CPU nothing else wants)
#   SKIP_BUILD [0]       1: use the existing target/release binaries
#   PERF [0]             1: record a perf profile of the gateway during each
#                        measured gateway run (perf-gateway-ROUND-RATE.txt; KEEP=1)
#   WAIT_QUIET [0]       before each rate, wait up to this many seconds for the
#                        machine to be quiet (< 0.3 cores busy over 2 s)
#   KEEP [0]             1: keep the work directory (config, DB, oha JSON, logs)
#   SERVER_EXTRA []      TOML lines added to the gateway's [server] section (e.g.
#                        "event_thread_nice = 0"), to measure a setting
#   OHA_DB [0]           1: oha also writes every request of each measured run
#                        (start, duration) to NAME.sqlite in the work directory,
#                        to see when the slow ones happen (use with KEEP=1)
#   OHA [oha on PATH, else ~/.cargo/bin/oha]
#   TOLLGATE_BIN [target/release/tollgate]  the gateway to measure (e.g. a
#                        patched build, to compare a change)
#
# Everything listens on 127.0.0.1; every wait is bounded; every process
# started here is stopped on exit.
set -euo pipefail

RATES=${RATES:-"500 2000"}
DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
ROUNDS=${ROUNDS:-1}
SUBSCRIBERS=${SUBSCRIBERS:-100}
CONNECTIONS=${CONNECTIONS:-50}
OHA_THREADS=${OHA_THREADS:-1}
UPSTREAM_THREADS=${UPSTREAM_THREADS:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
PERF=${PERF:-0}
SUBSCRIBER_NICE=${SUBSCRIBER_NICE:-0}
SUBSCRIBER_SCHED=${SUBSCRIBER_SCHED:-other}
WAIT_QUIET=${WAIT_QUIET:-0}
KEEP=${KEEP:-0}
OHA_DB=${OHA_DB:-0}
SERVER_EXTRA=${SERVER_EXTRA:-}
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN="$ROOT/target/release"
TOLLGATE_BIN=${TOLLGATE_BIN:-$BIN/tollgate}
WORK=$(mktemp -d /tmp/proxy-bench.XXXXXX)
PIDS=()

log() { printf '%s [proxy-bench] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ "$KEEP" = 1 ]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits (bounded) until FILE has a line matching REGEX; prints that line.
wait_for_line() {
    local file=$1 regex=$2 secs=$3 pid=${4:-}
    for _ in $(seq $((secs * 10))); do
        if grep -qE "$regex" "$file" 2>/dev/null; then
            grep -E "$regex" "$file" | head -1
            return 0
        fi
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    return 1
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Write system calls (write, writev…) a process has made so far.
write_calls() {
    [ -n "$1" ] || { echo 0; return; }
    awk '/^syscw:/ { print $2 }' "/proc/$1/io"
}

# CPU seconds (user+system, all threads) a process has used so far.
cpu_secs() {
    [ -n "$1" ] || { echo 0; return; }
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"
}

[ -x "$OHA" ] || die "oha not found (cargo install oha, or set OHA=)"
command -v sqlite3 >/dev/null || die "sqlite3 is needed to count ledger rows"

# ---------------------------------------------------------------- build
if [ "$SKIP_BUILD" != 1 ]; then
    log "building release binaries"
    (cd "$ROOT" && cargo build --release --bins) >&2
fi
[ -x "$TOLLGATE_BIN" ] && [ -x "$BIN/proxy-bench-upstream" ] || die "release binaries missing"

# ---------------------------------------------------------------- upstream
"$BIN/proxy-bench-upstream" serve --listen 127.0.0.1:0 --threads "$UPSTREAM_THREADS" \
    --max-secs 3600 >"$WORK/upstream.out" 2>"$WORK/upstream.err" &
UP_PID=$!
PIDS+=("$UP_PID")
UP_ADDR=$(wait_for_line "$WORK/upstream.out" '^LISTENING ' 10 "$UP_PID" | awk '{print $2}') \
    || die "the upstream did not start: $(cat "$WORK/upstream.err")"
log "upstream on $UP_ADDR (pid $UP_PID)"

# ---------------------------------------------------------------- gateway
GW_PORT=$(free_port)
CONFIG="$WORK/tollgate.toml"
cat >"$CONFIG" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"
$SERVER_EXTRA

[database]
url = "sqlite://$WORK/tollgate.db"

[features.websocket]
max_connections = 0

[providers.up]
type = "openai"
base_url = "http://$UP_ADDR/v1"

[[models]]
name = "bench-model"
provider = "up"
input_usd_per_mtok = 0.15
output_usd_per_mtok = 0.60
EOF

# RUST_LOG=info: the default of `serve`, pinned so that a debug level in the
# caller's environment cannot add per-request logging to the measurement.
RUST_LOG=info "$TOLLGATE_BIN" serve --config "$CONFIG" >"$WORK/gateway.out" 2>"$WORK/gateway.err" &
GW_PID=$!
PIDS+=("$GW_PID")
wait_for_line "$WORK/gateway.err" 'tollgate listening' 30 "$GW_PID" >/dev/null \
    || die "the gateway did not start: $(tail -20 "$WORK/gateway.err")"
ADMIN=$(grep -oE 'gw_live_[A-Za-z0-9_-]+' "$WORK/gateway.err" | head -1)
[ -n "$ADMIN" ] || die "no bootstrap key on the gateway's stderr"
GW="http://127.0.0.1:$GW_PORT"
log "gateway on $GW (pid $GW_PID)"

KEY=$("$TOLLGATE_BIN" keys --config "$CONFIG" create --name proxy-bench 2>>"$WORK/keys.err" | tail -1)
[[ "$KEY" == gw_live_* ]] || die "could not create an API key: $(cat "$WORK/keys.err")"

BODY='{"model":"bench-model","messages":[{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":16}'
UP_URL="http://$UP_ADDR/v1/chat/completions"
GW_URL="$GW/v1/chat/completions"

# ---------------------------------------------------------------- subscribers
SUB_PID=
if [ "$SUBSCRIBERS" -gt 0 ]; then
    PROXY_BENCH_TOKEN=$ADMIN chrt "--$SUBSCRIBER_SCHED" 0 nice -n "$SUBSCRIBER_NICE" "$BIN/proxy-bench-upstream" subscribe \
        --url "ws://127.0.0.1:$GW_PORT/ws/events" --count "$SUBSCRIBERS" \
        --max-secs 3600 --quiet-ms 1000 --ids-dir "$WORK/ids" \
        >"$WORK/subscribers.out" 2>"$WORK/subscribers.err" &
    SUB_PID=$!
    PIDS+=("$SUB_PID")
    wait_for_line "$WORK/subscribers.out" '^READY ' 60 "$SUB_PID" >/dev/null \
        || die "the subscribers did not connect: $(cat "$WORK/subscribers.err")"
    log "$SUBSCRIBERS subscribers attached (pid $SUB_PID)"
else
    log "no subscribers attached (SUBSCRIBERS=0)"
fi

# One request by hand: the route works before anything is measured.
SANITY=$(curl -sS --max-time 10 -o "$WORK/sanity.json" -w '%{http_code}' "$GW_URL" \
    -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' -d "$BODY")
[ "$SANITY" = 200 ] || die "sanity request answered $SANITY: $(cat "$WORK/sanity.json")"
EXPECTED=1     # gateway requests sent so far (every one must be recorded)
EXPECTED_OK=1

# ---------------------------------------------------------------- load
HZ=$(getconf CLK_TCK)
# Busy jiffies of the whole machine (user nice system irq softirq steal).
machine_busy() { awk '/^cpu /{ print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
# Stolen jiffies: time the hypervisor ran something else while this VM's
# CPUs had work (it grows with the load on a shared host, and every thread
# here waits through it).
machine_steal() { awk '/^cpu /{ print $9 }' /proc/stat; }

# Waits up to WAIT_QUIET seconds for the machine to be quiet (under 0.3
# cores busy over 2 s), so that other work on it disturbs less.
wait_quiet() {
    [ "$WAIT_QUIET" -gt 0 ] || return 0
    local deadline=$((SECONDS + WAIT_QUIET)) b0 b1
    while [ "$SECONDS" -lt "$deadline" ]; do
        b0=$(machine_busy); sleep 2; b1=$(machine_busy)
        if awk -v d=$((b1 - b0)) -v hz="$HZ" 'BEGIN { exit !(d / hz / 2 < 0.3) }'; then
            return 0
        fi
    done
    log "the machine did not become quiet within ${WAIT_QUIET}s; measuring anyway"
}

# measure NAME URL RATE SECS [extra oha args…]: one oha run → $WORK/NAME.json,
# and $WORK/NAME.cpu: "machine gateway subscribers upstream oha steal" CPU
# cores busy (stolen) on average during the run, then the gateway's write
# system calls per second.
measure() {
    local name=$1 url=$2 rate=$3 secs=$4
    shift 4
    local m0 g0 s0 u0 m1 g1 s1 u1 t0 t1 st0 st1 w0 w1 perf_pid=
    w0=$(write_calls "$GW_PID"); st0=$(machine_steal); m0=$(machine_busy); g0=$(cpu_secs "$GW_PID"); s0=$(cpu_secs "$SUB_PID"); u0=$(cpu_secs "$UP_PID")
    t0=$(date +%s.%N)
    if [ "$PERF" = 1 ] && [[ "$name" == gateway-* ]]; then
        perf record -F 999 -p "$GW_PID" -o "$WORK/perf-$name.data" \
            -- sleep "$secs" >/dev/null 2>>"$WORK/perf.err" &
        perf_pid=$!
    fi
    if [ "$OHA_DB" = 1 ] && [[ "$name" != warm-* ]]; then
        set -- "$@" --db-url "$WORK/$name.sqlite"
    fi
    /usr/bin/time -f '%U %S' -o "$WORK/$name.time" \
        "$OHA" --no-tui --output-format json -o "$WORK/$name.json" \
        --worker-threads "$OHA_THREADS" -c "$CONNECTIONS" \
        -q "$rate" -z "${secs}s" -w -t 10s \
        -m POST -T application/json -d "$BODY" "$@" "$url" 2>>"$WORK/oha.err"
    t1=$(date +%s.%N)
    st1=$(machine_steal); m1=$(machine_busy); g1=$(cpu_secs "$GW_PID"); s1=$(cpu_secs "$SUB_PID"); u1=$(cpu_secs "$UP_PID")
    w1=$(write_calls "$GW_PID")
    if [ -n "$perf_pid" ]; then
        wait "$perf_pid" || true
        perf report -i "$WORK/perf-$name.data" --no-children --sort dso,sym \
            --percent-limit 0.5 --stdio >"$WORK/perf-$name.txt" 2>>"$WORK/perf.err" || true
    fi
    awk -v m=$((m1 - m0)) -v st=$((st1 - st0)) -v wr=$((w1 - w0)) -v hz="$HZ" -v g0="$g0" -v g1="$g1" -v s0="$s0" -v s1="$s1" \
        -v u0="$u0" -v u1="$u1" -v t0="$t0" -v t1="$t1" -v oha="$(tail -1 "$WORK/$name.time")" \
        'BEGIN { split(oha, o, " "); w = t1 - t0;
                 printf "%.2f %.2f %.2f %.2f %.2f %.2f %.0f\n", m / hz / w, (g1 - g0) / w, (s1 - s0) / w, (u1 - u0) / w, (o[1] + o[2]) / w, st / hz / w, wr / w }' \
        >"$WORK/$name.cpu"
}

# Prints "ok total p50_ms p99_ms" of an oha JSON result.
oha_stats() {
    python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
codes = d.get("statusCodeDistribution") or {}
errors = sum((d.get("errorDistribution") or {}).values())
ok = codes.get("200", 0)
total = sum(codes.values()) + errors
p = d["latencyPercentiles"]
print(ok, total, "%.3f" % (p["p50"] * 1e3), "%.3f" % (p["p99"] * 1e3))
PY
}

# Counts what a gateway run sent, so the loss check knows what to expect.
account_gateway() {
    local ok total
    read -r ok total _ _ < <(oha_stats "$1")
    EXPECTED=$((EXPECTED + total))
    EXPECTED_OK=$((EXPECTED_OK + ok))
}

RESULTS="$WORK/results.tsv"
printf 'round\trate\tdirect_p50\tdirect_p99\tgateway_p50\tgateway_p99\toverhead_p50\toverhead_p99\tdirect_ok\tgateway_ok\tgw_cpu_us_per_req\tgw_writes_per_req\tsubs_cpu_us_per_req\tgw_run_cores\tother_cores\tsteal_cores\tloadavg\n' >"$RESULTS"

for round in $(seq "$ROUNDS"); do
    for rate in $RATES; do
        wait_quiet
        log "round $round, $rate req/s: warm-up ${WARMUP}s each, then ${DURATION}s direct, ${DURATION}s gateway"
        load=$(cut -d' ' -f1 /proc/loadavg)
        measure "warm-direct-$round-$rate" "$UP_URL" "$rate" "$WARMUP"
        measure "direct-$round-$rate" "$UP_URL" "$rate" "$DURATION"
        measure "warm-gateway-$round-$rate" "$GW_URL" "$rate" "$WARMUP" -H "Authorization: Bearer $KEY"
        account_gateway "$WORK/warm-gateway-$round-$rate.json"
        measure "gateway-$round-$rate" "$GW_URL" "$rate" "$DURATION" -H "Authorization: Bearer $KEY"
        account_gateway "$WORK/gateway-$round-$rate.json"
        read -r d_ok d_total d50 d99 < <(oha_stats "$WORK/direct-$round-$rate.json")
        read -r g_ok g_total g50 g99 < <(oha_stats "$WORK/gateway-$round-$rate.json")
        python3 - "$round" "$rate" "$d50" "$d99" "$g50" "$g99" "$d_ok/$d_total" "$g_ok/$g_total" \
            "$(cat "$WORK/direct-$round-$rate.cpu")" "$(cat "$WORK/gateway-$round-$rate.cpu")" \
            "$rate" "$load" >>"$RESULTS" <<'PY'
import sys
r, rate, d50, d99, g50, g99, dok, gok, dcpu, gcpu, per_sec, load = sys.argv[1:]
d50, d99, g50, g99 = map(float, (d50, d99, g50, g99))
dm, dg, ds, du, do, dst, _ = map(float, dcpu.split())
gm, gg, gs, gu, go, gst, gw = map(float, gcpu.split())
# CPU (cores) used by processes other than this benchmark's (and by the
# kernel outside them), during each run; stolen time is its own column.
other = max(dm - dst - dg - ds - du - do, gm - gst - gg - gs - gu - go, 0.0)
print("\t".join([r, rate, "%.3f" % d50, "%.3f" % d99, "%.3f" % g50, "%.3f" % g99,
                 "%.3f" % (g50 - d50), "%.3f" % (g99 - d99), dok, gok,
                 "%.0f" % (gg / float(per_sec) * 1e6), "%.1f" % (gw / float(per_sec)),
                 "%.0f" % (gs / float(per_sec) * 1e6),
                 "%.2f gw + %.2f subs + %.2f up + %.2f oha" % (gg, gs, gu, go), "%.2f" % other,
                 "%.2f / %.2f" % (dst, gst), load]))
PY
    done
done

# ---------------------------------------------------------------- loss check
log "waiting for the ledger to settle"
DB="$WORK/tollgate.db"
rows() { sqlite3 -cmd '.timeout 5000' "$DB" "$1"; }
previous=-1
for _ in $(seq 60); do
    now=$(rows 'SELECT COUNT(*) FROM usage_ledger')
    [ "$now" = "$previous" ] && [ "$now" -ge "$EXPECTED" ] && break
    previous=$now
    sleep 0.5
done
LEDGER_ROWS=$(rows 'SELECT COUNT(*) FROM usage_ledger')
LEDGER_OK=$(rows 'SELECT COUNT(*) FROM usage_ledger WHERE status = 200')
LEDGER_TOKENS=$(rows 'SELECT COUNT(*) FROM usage_ledger WHERE input_tokens > 0 OR output_tokens > 0')
AUDIT_ROWS=$(rows "SELECT COUNT(*) FROM audit_log WHERE event_type = 'audit.request'")
API_REQUESTS=$(curl -sS --max-time 30 "$GW/admin/v1/usage" -H "Authorization: Bearer $ADMIN" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["totals"]["requests"])')

if [ -n "$SUB_PID" ]; then
    log "stopping the subscribers (they drain until 1 s without a frame)"
    kill -TERM "$SUB_PID"
    SUB_RESULT=$(wait_for_line "$WORK/subscribers.out" '^RESULT ' 90 "$SUB_PID" | sed 's/^RESULT //') \
        || die "the subscribers gave no result: $(cat "$WORK/subscribers.err")"
else
    SUB_RESULT=null
    mkdir -p "$WORK/ids"
    : >"$WORK/ids/audit-ids.txt"
    : >"$WORK/ids/usage-ids.txt"
    : >"$WORK/ids/audit-received.txt"
fi

rows 'SELECT request_id FROM usage_ledger' | sort >"$WORK/ledger-ids.txt"
rows 'SELECT request_id, at FROM usage_ledger' >"$WORK/ledger-at.txt"
sort "$WORK/ids/audit-ids.txt" >"$WORK/sub0-audit-sorted.txt"
sort "$WORK/ids/usage-ids.txt" >"$WORK/sub0-usage-sorted.txt"

# ---------------------------------------------------------------- report
echo
echo "## proxy overhead ($(date -u +%FT%TZ), $(nproc) cores, loadavg now $(cut -d' ' -f1-3 /proc/loadavg))"
echo "source: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo " + uncommitted changes in: $(git -C "$ROOT" diff --name-only HEAD -- src | tr '\n' ' ')"); gateway: $TOLLGATE_BIN"
echo "CPU columns: averages over the measured run; \"other load\" = machine CPU minus this benchmark's processes and stolen time (the larger of the direct and gateway runs); \"steal\" = CPU time the hypervisor took from this VM (direct run / gateway run): runs with steal are disturbed from outside"
echo "oha: -c $CONNECTIONS --worker-threads $OHA_THREADS -z ${DURATION}s -w, warm-up ${WARMUP}s; subscribers: $SUBSCRIBERS (admin key, all topics, nice $SUBSCRIBER_NICE, policy $SUBSCRIBER_SCHED)"
echo
python3 - "$RESULTS" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print("| round | rate (req/s) | direct p50 | direct p99 | gateway p50 | gateway p99 | overhead p50 | overhead p99 | ok/total direct | ok/total gateway | gateway CPU/req | gateway write calls/req | subscribers CPU/req | cores busy in gateway run | other load (cores) | steal (cores) | loadavg |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['round']} | {r['rate']} | {r['direct_p50']} ms | {r['direct_p99']} ms | {r['gateway_p50']} ms | {r['gateway_p99']} ms | "
          f"**{r['overhead_p50']} ms** | **{r['overhead_p99']} ms** | {r['direct_ok']} | {r['gateway_ok']} | "
          f"{r['gw_cpu_us_per_req']} µs | {r['gw_writes_per_req']} | {r['subs_cpu_us_per_req']} µs | {r['gw_run_cores']} | {r['other_cores']} | {r['steal_cores']} | {r['loadavg']} |")
# Stolen time stalls every thread of the VM at once: such a run's p99
# measures the host (BENCHMARKS.md, 2026-12-03).
stolen = [f"round {r['round']} at {r['rate']} req/s" for r in rows
          if max(map(float, r['steal_cores'].split(' / '))) > 0.05]
if stolen:
    print()
    print("WARNING: more than 0.05 cores stolen by the hypervisor in " + ", ".join(stolen)
          + ": their latencies are the host's, not the gateway's")
PY
echo
LOSS_STATUS=0
python3 - "$SUB_RESULT" "$EXPECTED" "$EXPECTED_OK" "$LEDGER_ROWS" "$LEDGER_OK" "$LEDGER_TOKENS" \
    "$AUDIT_ROWS" "$API_REQUESTS" "$WORK" <<'PY' || LOSS_STATUS=$?
import json, sys
sub = json.loads(sys.argv[1])
expected, expected_ok, ledger, ledger_ok, ledger_tokens, audit_rows, api_requests = map(int, sys.argv[2:9])
work = sys.argv[9]
def ids(name):
    return [line.strip() for line in open(f"{work}/{name}") if line.strip()]
ledger_ids = ids("ledger-ids.txt")
sub_audit, sub_usage = ids("sub0-audit-sorted.txt"), ids("sub0-usage-sorted.txt")
checks = [
    ("gateway requests sent (oha + 1 sanity), all answered 200", expected == expected_ok, f"{expected_ok}/{expected}"),
    ("ledger rows (usage_ledger) = requests sent", ledger == expected, f"{ledger}"),
    ("ledger rows with status 200", ledger_ok == expected_ok, f"{ledger_ok}"),
    ("GET /admin/v1/usage totals.requests", api_requests == expected, f"{api_requests}"),
    ("audit_log audit.request rows", audit_rows == expected, f"{audit_rows}"),
    ("ledger request ids distinct", len(set(ledger_ids)) == len(ledger_ids) == ledger, f"{len(set(ledger_ids))}"),
]
if sub is not None:
    checks += [
    ("subscribers connected to the end", sub["closed_early"] == 0, f"{sub['connected'] - sub['closed_early']}/{sub['subscribers']}"),
    ("audit.request per subscriber (min/max)", sub["audit_request"]["min"] == sub["audit_request"]["max"] == expected,
        f"{sub['audit_request']['min']}/{sub['audit_request']['max']}"),
    ("usage.recorded per subscriber (min/max)", sub["usage_recorded"]["min"] == sub["usage_recorded"]["max"] == ledger_tokens == expected,
        f"{sub['usage_recorded']['min']}/{sub['usage_recorded']['max']}"),
    ("every subscriber saw the same request ids (checksum)", sub["same_audit_ids"] and sub["same_usage_ids"], ""),
    ("subscriber 0's ids = ledger request ids, no duplicate",
        sub_audit == ledger_ids and sub_usage == ledger_ids and len(set(ledger_ids)) == len(ledger_ids), f"{len(set(ledger_ids))} distinct"),
    ("lagged frames / missed events", sub["lagged_frames"] == 0 and sub["missed"] == 0, f"{sub['lagged_frames']} / {sub['missed']}"),
]
    # The promise: a subscriber sees a request's events within 100 ms of its
    # response's end (the ledger's `at`, in ms, taken as the request
    # finishes; arrival in µs, same clock). Subscriber 0's audit.request.
    finished = {}
    for line in open(f"{work}/ledger-at.txt"):
        rid, _, at = line.strip().partition("|")
        finished[rid] = int(at)
    delays = sorted(int(us) / 1000 - finished[rid]
                    for rid, us in (line.split() for line in open(f"{work}/ids/audit-received.txt") if line.strip())
                    if rid in finished)
    if delays:
        at = lambda q: delays[min(len(delays) - 1, int(len(delays) * q))]
        checks.append(("audit.request at subscriber 0 within 100 ms of the request's end (p50 / p99 / max)",
                       delays[-1] <= 100, "%.1f / %.1f / %.1f ms" % (at(0.5), at(0.99), delays[-1])))
print("| loss check | result | value |")
print("|---|---|---|")
for name, ok, value in checks:
    print(f"| {name} | {'ok' if ok else 'FAILED'} | {value} |")
print()
print("subscribers:", json.dumps(sub))
passed = all(ok for _, ok, _ in checks)
print("LOSS_CHECK", "PASSED" if passed else "FAILED")
sys.exit(0 if passed else 3)
PY
echo
log "gateway stderr lines: $(wc -l <"$WORK/gateway.err"); oha errors: $(wc -c <"$WORK/oha.err") bytes"
exit "$LOSS_STATUS"
