#!/usr/bin/env bash
# The aigateway load benchmark (`make bench`).
#
# Starts, all on 127.0.0.1: two nginx targets (one nginx, two server blocks)
# answering a fixed ~600-byte chat completion, a Twisted SSE target
# (bench/sse_target.py), nginx as a reference reverse proxy over the same
# targets, and aigateway (twistd, temp SQLite, pinned to CPU 1) configured
# through its Admin API.  Then measures, load generators pinned to CPU 0:
#   1. wrk, 50 keep-alive connections, POST chat: direct / nginx / aigateway
#      (+ gateway CPU µs per request and RSS idle/under load)
#   2. hey at ~1,000 req/s: latency added, direct / nginx / aigateway
#      (+ the gateway's own X-Proxy-Latency header, bench/latency_sample.py)
#   3. 100 concurrent SSE streams of 20 chunks 20 ms apart
#      (bench/stream_client.py): time to first chunk and total time
#   4. ~10,000 concurrent slow streams held open through the gateway
#   4b. the same through two gateway processes sharing one reuseport: port
#      (BENCH_TWO_PROCESSES=0 skips it)
#   5. observability cost: wrk through fresh gateways with --no-metrics,
#      --access-log, both; and through the default one to a text/plain
#      answer (no usage sniffing): non-AI vs AI traffic
#   6. a py-spy profile of the gateway under the wrk load
#   7. instructions per request (callgrind, user space) of the gateway, of
#      nginx as a proxy and of the target, each in a fresh process under
#      valgrind: a figure that does not move with the machine's load
# and appends a dated Markdown report to bench/RESULTS.md (bench/report.py).
# Everything it starts is stopped by PID on exit.
#
# Environment: BENCH_QUICK=1 (3 s runs, fewer rounds, 2,000 slow streams),
# BENCH_DURATION (s), BENCH_STREAMS (slow streams), BENCH_SLOW_CHUNKS (20),
# BENCH_SLOW_RAMP (800 streams/s), BENCH_GW_BACKLOG (4096), BENCH_PORT_BASE (18100; 21 ports from it),
# BENCH_IR_REQUESTS (requests counted under callgrind: 2,000; 0 skips it),
# BENCH_NO_RESULTS=1 (do not touch bench/RESULTS.md), BENCH_COMMAND (how the
# run was started, for the report).

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/bench
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
TWISTD=$VENV/bin/twistd
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=$BENCH/out/run-$STAMP
mkdir -p "$OUT"

QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
    DURATION=${BENCH_DURATION:-3}; WARMUP=1; ROUNDS=1; MANY=${BENCH_STREAMS:-2000}; SAMPLES=200
else
    DURATION=${BENCH_DURATION:-10}; WARMUP=2; ROUNDS=3; MANY=${BENCH_STREAMS:-10000}; SAMPLES=500
fi
BASE=${BENCH_PORT_BASE:-18100}
T1=$BASE; T2=$((BASE + 1)); SSE=$((BASE + 2)); NGX=$((BASE + 3)); GW=$((BASE + 4)); ADMIN=$((BASE + 5))
# The observability variants (one at a time, 4 of them): proxy BASE+6+2i,
# admin BASE+7+2i.
VARIANT_BASE=$((BASE + 6))
VARIANT_PORTS=8
# Under callgrind: the target, nginx as a proxy, the gateway and its Admin API.
IR_TARGET=$((BASE + 14)); IR_NGX=$((BASE + 15)); IR_GW=$((BASE + 16)); IR_ADMIN=$((BASE + 17))
IR_REQUESTS=${BENCH_IR_REQUESTS:-2000}
# Two gateway processes on one reuseport: port, and their Admin APIs.
RP_GW=$((BASE + 18)); RP_ADMIN=$((BASE + 19))
CONNS=50
# nginx and the targets listen with backlog=4096; give the gateway the same
# (its default, 50, drops SYNs when 100 clients connect at once: +1 s).
GW_BACKLOG=${BENCH_GW_BACKLOG:-4096}

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
metric() { printf '%s %s\n' "$1" "$2" >> "$OUT/metrics.txt"; }

# --- cleanup: stop what we started, by PID -------------------------------
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [ $rc -ne 0 ]; then log "exit $rc; logs in $OUT"; fi
    exit $rc
}
trap cleanup EXIT INT TERM

# --- 1. tools --------------------------------------------------------------
need=()
for tool in wrk nginx hey taskset curl valgrind; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
    pkgs=()
    for tool in "${need[@]}"; do
        case $tool in taskset) pkgs+=(util-linux) ;; *) pkgs+=("$tool") ;; esac
    done
    log "installing ${pkgs[*]} with apt-get"
    SUDO=; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
[ -x "$TWISTD" ] || die "$TWISTD missing: run make (the venv) first"
if [ ! -x "$VENV/bin/py-spy" ]; then
    log "installing py-spy into the venv"
    "$VENV/bin/pip" install --quiet py-spy || log "py-spy unavailable: no profile"
fi

# Raise the descriptor limit as far as allowed; every process inherits it.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
NCPU=$(nproc)
[ "$NCPU" -ge 2 ] || die "needs 2 CPUs (load generator on CPU 0, proxy on CPU 1)"
CLK=$(getconf CLK_TCK)

# --- helpers ------------------------------------------------------------------
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_http() { # url what [timeout-s]
    local deadline=$((SECONDS + ${3:-20}))
    until curl -sf -o /dev/null --max-time 2 "$1"; do
        [ $SECONDS -lt $deadline ] || die "$2 not ready at $1 (see $OUT)"
        sleep 0.1
    done
}
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
rss_kb() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
sample_rss() { # pid seconds outfile: max VmRSS (kB) over the window
    local max=0 v end=$((SECONDS + $2))
    while [ $SECONDS -lt $end ] && kill -0 "$1" 2>/dev/null; do
        v=$(rss_kb "$1" 2>/dev/null || echo 0)
        [ "${v:-0}" -gt "$max" ] && max=$v && echo "$max" > "$3"
        sleep 0.25
    done
}
start() { # name command...: background, remember the PID
    local name=$1; shift
    "$@" > "$OUT/$name.out" 2> "$OUT/$name.err" &
    PIDS+=("$!")
    eval "PID_${name//-/_}=$!"
}

for p in $T1 $T2 $SSE $NGX $GW $ADMIN $(seq "$VARIANT_BASE" $((VARIANT_BASE + VARIANT_PORTS - 1))) \
    $IR_TARGET $IR_NGX $IR_GW $IR_ADMIN $RP_GW $RP_ADMIN $((RP_ADMIN + 1)); do
    port_busy "$p" && die "port $p is in use (set BENCH_PORT_BASE)"
done

metric git_commit "\"$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')\""
# The gateway runs from this working tree: say if it differs from HEAD.
metric git_dirty "\"$(cd "$ROOT" && git status --porcelain -- aigateway twisted 2>/dev/null | awk '{print $2}' | tr '\n' ' ')\""
metric loadavg_start "\"$(cut -d' ' -f1-3 /proc/loadavg)\""
log "output in $OUT (quick=$QUICK, ${DURATION}s runs, nofile=$NOFILE)"

# --- 2. targets ------------------------------------------------------------------
CHAT_JSON='{"id":"chatcmpl-9bench0000000000000000000001","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"A reverse proxy keeps connections to its targets alive so that each request skips the TCP handshake and slow start, which cuts latency and CPU on both sides.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":41,"completion_tokens":33,"total_tokens":74,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp_bench0001"}'

nginx_common() { # name
    mkdir -p "$OUT/nginx-$1"
    cat <<EOF
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $OUT/nginx-$1/nginx.pid;
error_log $OUT/nginx-$1/error.log warn;
user root;
events { worker_connections 16384; multi_accept on; }
http {
    access_log off;
    client_body_temp_path $OUT/nginx-$1/body;
    proxy_temp_path $OUT/nginx-$1/proxy;
    fastcgi_temp_path $OUT/nginx-$1/fastcgi;
    uwsgi_temp_path $OUT/nginx-$1/uwsgi;
    scgi_temp_path $OUT/nginx-$1/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 65;
    tcp_nodelay on;
EOF
}

{
    nginx_common targets
    for port in $T1 $T2; do
        cat <<EOF
    server {
        listen 127.0.0.1:$port backlog=4096;
        location = /health { default_type text/plain; return 200 'ok'; }
        # Non-AI traffic: the same bytes as text/plain (no usage sniffing).
        location /plain { default_type text/plain; return 200 '$CHAT_JSON'; }
        location / { default_type application/json; return 200 '$CHAT_JSON'; }
    }
EOF
    done
    echo "}"
} > "$OUT/nginx-targets.conf"

{
    nginx_common proxy
    cat <<EOF
    upstream chat { server 127.0.0.1:$T1; server 127.0.0.1:$T2; keepalive 128; }
    upstream sse { server 127.0.0.1:$SSE; keepalive 128; }
    server {
        listen 127.0.0.1:$NGX backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / { proxy_pass http://chat; }
        location /sse { proxy_pass http://sse; proxy_buffering off; proxy_read_timeout 120s; }
    }
}
EOF
} > "$OUT/nginx-proxy.conf"

# Targets float between both CPUs; each proxy under test gets CPU 1 to itself
# (apart from the targets), the load generators CPU 0.
start targets nginx -p "$OUT" -c "$OUT/nginx-targets.conf"
start sse "$PY" "$BENCH/sse_target.py" --port "$SSE"
start nginx_proxy taskset -c 1 nginx -p "$OUT" -c "$OUT/nginx-proxy.conf"
wait_http "http://127.0.0.1:$T1/health" "nginx target 1"
wait_http "http://127.0.0.1:$T2/health" "nginx target 2"
wait_http "http://127.0.0.1:$SSE/health" "SSE target"
wait_http "http://127.0.0.1:$NGX/health" "nginx proxy"

# --- 4. the gateway ------------------------------------------------------------
start gateway taskset -c 1 "$TWISTD" -n --pidfile "$OUT/twistd.pid" --logfile "$OUT/gateway.log" \
    aigateway --proxy "tcp:$GW:interface=127.0.0.1:backlog=$GW_BACKLOG" --admin "tcp:$ADMIN:interface=127.0.0.1" \
    --database "$OUT/gateway.db"
GWPID=$PID_gateway
wait_http "http://127.0.0.1:$ADMIN/status" "aigateway Admin API" 30

admin() { # admin-port path form-fields...: POST, expect 201
    local port=$1 path=$2 code; shift 2
    local args=()
    for field in "$@"; do args+=(--data-urlencode "$field"); done
    code=$(curl -sS -o "$OUT/admin.last" -w '%{http_code}' "${args[@]}" "http://127.0.0.1:$port$path")
    [ "$code" = 201 ] || die "POST :$port$path $* answered $code: $(cat "$OUT/admin.last")"
}
configure_chat() { # admin-port: the chat route (every path) over both nginx targets
    admin "$1" /upstreams name=chat
    admin "$1" /upstreams/chat/targets "target=127.0.0.1:$T1" weight=100
    admin "$1" /upstreams/chat/targets "target=127.0.0.1:$T2" weight=100
    admin "$1" /services name=chat host=chat
    admin "$1" /services/chat/routes 'paths[]=/' strip_path=false
}
configure_chat "$ADMIN"
admin "$ADMIN" /upstreams name=sse
admin "$ADMIN" /upstreams/sse/targets "target=127.0.0.1:$SSE" weight=100
admin "$ADMIN" /services name=sse host=sse
admin "$ADMIN" /services/sse/routes 'paths[]=/sse' strip_path=false
wait_http "http://127.0.0.1:$GW/health" "aigateway proxy route" 20
wait_http "http://127.0.0.1:$GW/sse/x?chunks=1&delay=0" "aigateway SSE route" 20
curl -sf "http://127.0.0.1:$GW/v1/chat/completions" -d '{}' -o "$OUT/sample-gateway.json" -D "$OUT/sample-gateway.headers"
curl -sf "http://127.0.0.1:$GW/plain" -d '{}' -o "$OUT/sample-plain.txt" -D "$OUT/sample-plain.headers"
grep -qi '^content-type: text/plain' "$OUT/sample-plain.headers" || die "/plain through the gateway is not text/plain"
sleep 1
metric gw_rss_idle_kb "$(rss_kb "$GWPID")"

# --- 5. throughput with wrk ------------------------------------------------------
run_wrk() { # name port pid [path] [rounds]: the PID whose CPU time is charged to the requests
    # With several rounds, each is kept (wrk-NAME.rR.txt, metric
    # wrk_NAME_rR_cpu_s) and the report shows the median round by CPU per
    # request, with the spread: single runs on a shared machine vary by
    # +-20 %.
    local name=$1 port=$2 pid=$3 url="http://127.0.0.1:$2${4:-/v1/chat/completions}" rounds=${5:-1} r
    taskset -c 0 wrk -t1 -c$CONNS -d${WARMUP}s -s "$BENCH/chat.lua" "$url" > /dev/null
    for r in $(seq "$rounds"); do
        local before=$(cpu_ticks "$pid")
        sample_rss "$pid" "$((DURATION + 1))" "$OUT/rss-$name.r$r.kb" &
        local sampler=$!
        log "wrk $name: $CONNS connections, ${DURATION}s (round $r of $rounds)"
        taskset -c 0 wrk -t1 -c$CONNS -d${DURATION}s --timeout 5s --latency -s "$BENCH/chat.lua" "$url" > "$OUT/wrk-$name.r$r.txt"
        local after=$(cpu_ticks "$pid")
        kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
        metric "wrk_${name}_r${r}_cpu_s" "$(awk -v a="$after" -v b="$before" -v c="$CLK" 'BEGIN{print (a-b)/c}')"
        grep -q WRKJSON "$OUT/wrk-$name.r$r.txt" || die "wrk $name printed no summary"
    done
    metric "wrk_${name}_rounds" "$rounds"
    # The RSS peak over all rounds.
    sort -n "$OUT"/rss-"$name".r*.kb 2>/dev/null | tail -1 > "$OUT/rss-$name.kb" || true
}
# nginx does its work in its (single) worker process, not the master.
TARGET_WORKER=$(pgrep -P "$PID_targets" | head -1)
PROXY_WORKER=$(pgrep -P "$PID_nginx_proxy" | head -1)
[ -n "$TARGET_WORKER" ] && [ -n "$PROXY_WORKER" ] || die "nginx workers not found"
run_wrk direct "$T1" "$TARGET_WORKER" "" "$ROUNDS"
run_wrk nginx "$NGX" "$PROXY_WORKER" "" "$ROUNDS"
run_wrk gateway "$GW" "$GWPID" "" "$ROUNDS"
metric gw_rss_load_kb "$(cat "$OUT/rss-gateway.kb" 2>/dev/null || echo 0)"

# --- 5b. observability cost -------------------------------------------------------
# (a) is the default gateway's figure above: metrics on, no access log;
# (a') the same options in a fresh process like (b)-(d), to show the noise.
# (e) non-AI traffic: the same gateway, the same body as text/plain, which
# the usage sniffer skips (it reads only JSON and SSE answers).
run_wrk gw-plain "$GW" "$GWPID" /plain
stop_pid() { # pid: TERM, wait up to 10 s, KILL; forget it
    local pid=$1 left=()
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || left+=("$p"); done
    PIDS=("${left[@]}")
}
VARIANT_PORT=$VARIANT_BASE
run_variant() { # name gateway-options...: fresh gateway on CPU 1, chat route, wrk, stop
    local name=$1 port=$VARIANT_PORT admin_port=$((VARIANT_PORT + 1)) pid; shift
    VARIANT_PORT=$((VARIANT_PORT + 2))
    start "gw-$name" taskset -c 1 "$TWISTD" -n --pidfile "$OUT/twistd-$name.pid" --logfile "$OUT/gateway-$name.log" \
        aigateway --proxy "tcp:$port:interface=127.0.0.1:backlog=$GW_BACKLOG" \
        --admin "tcp:$admin_port:interface=127.0.0.1" --database "$OUT/gateway-$name.db" "$@"
    pid=$!
    wait_http "http://127.0.0.1:$admin_port/status" "aigateway ($name) Admin API" 30
    configure_chat "$admin_port"
    wait_http "http://127.0.0.1:$port/health" "aigateway ($name) proxy route" 20
    run_wrk "gw-$name" "$port" "$pid"
    stop_pid "$pid"
}
run_variant default
run_variant no-metrics --no-metrics
run_variant access-log --access-log "$OUT/access.log"
metric access_log_lines "$(wc -l < "$OUT/access.log" 2>/dev/null || echo 0)"
run_variant no-metrics-access-log --no-metrics --access-log "$OUT/access-nometrics.log"

# --- 6. latency at a fixed rate with hey ----------------------------------------
printf '%s' "$(sed -n "s/^wrk.body = '\(.*\)'$/\1/p" "$BENCH/chat.lua")" > "$OUT/body.json"
run_hey() { # name port workers rate-per-worker
    log "hey $1: $3 workers x $4 req/s, ${DURATION}s"
    taskset -c 0 hey -z "${DURATION}s" -c "$3" -q "$4" -m POST -T application/json -D "$OUT/body.json" \
        "http://127.0.0.1:$2/v1/chat/completions" > "$OUT/hey-$1.txt"
}
# hey's workers tick in step, so -c 50 -q 20 sends bursts of 50 requests every
# 50 ms; -c 4 -q 250 (bursts of 4 every 4 ms) is the same rate, smoother.
run_hey direct "$T1" 50 20
run_hey nginx "$NGX" 50 20
run_hey gateway "$GW" 50 20
run_hey smooth-direct "$T1" 4 250
run_hey smooth-nginx "$NGX" 4 250
run_hey smooth-gateway "$GW" 4 250
log "sampling X-Proxy-Latency ($SAMPLES requests)"
taskset -c 0 "$PY" "$BENCH/latency_sample.py" --port "$GW" --count "$SAMPLES" > "$OUT/latency-headers.json"

# --- 7. streaming: 100 concurrent SSE streams -------------------------------------
run_streams() { # name port path
    log "streams $1: 100 concurrent x 20 chunks x 20 ms, $ROUNDS round(s)"
    taskset -c 0 "$PY" "$BENCH/stream_client.py" --port "$2" --path "$3" --streams 100 \
        --chunks 20 --delay 0.02 --rounds "$ROUNDS" --warmup 1 --timeout 30 > "$OUT/streams-$1.json"
}
run_streams direct "$SSE" /sse/v1/chat/completions
run_streams nginx "$NGX" /sse/v1/chat/completions
run_streams gateway "$GW" /sse/v1/chat/completions

# --- 10. profile under the wrk load (before the slow streams, whose garbage
# would make collections show up at random allocation sites) ---------------------------------------------------
if [ -x "$VENV/bin/py-spy" ]; then
    log "profiling the gateway with py-spy under wrk, ${DURATION}s"
    taskset -c 0 wrk -t1 -c$CONNS -d$((DURATION + 2))s -s "$BENCH/chat.lua" \
        "http://127.0.0.1:$GW/v1/chat/completions" > "$OUT/wrk-profile.txt" &
    wrkpid=$!
    sleep 1
    if ! taskset -c 0 "$VENV/bin/py-spy" record --pid "$GWPID" --duration "$DURATION" --rate 250 \
        --format raw --full-filenames --output "$OUT/profile.raw" > "$OUT/py-spy.log" 2>&1; then
        log "py-spy failed: $(tail -1 "$OUT/py-spy.log")"
    fi
    wait "$wrkpid" || true
fi

# --- 8. concurrency: many slow streams through the gateway -------------------------
# The gateway holds two descriptors per stream (client and target side).
FDMAX=$(( (NOFILE - 200) / 2 ))
if [ "$MANY" -gt "$FDMAX" ]; then
    metric many_note "\"$MANY streams need $((2 * MANY + 200)) descriptors in the gateway; the hard limit here is $NOFILE (no CAP_SYS_RESOURCE to raise it), so $FDMAX streams were run\""
    MANY=$FDMAX
fi
# Open slowly enough for the gateway to keep up, and stream long enough for
# every stream to be open at the same time.
MANY_CHUNKS=${BENCH_SLOW_CHUNKS:-20}
MANY_RAMP=${BENCH_SLOW_RAMP:-800}
metric many_streams "$MANY"
metric many_chunks "$MANY_CHUNKS"
metric many_ramp "$MANY_RAMP"
metric gw_backlog "$GW_BACKLOG"
HOLD=$(( MANY / MANY_RAMP + MANY_CHUNKS + 20 ))
slow_streams() { # port streams out-json: the slow-stream client, bounded by HOLD s
    taskset -c 0 "$PY" "$BENCH/stream_client.py" --port "$1" --path /sse/v1/chat/completions --streams "$2" \
        --chunks "$MANY_CHUNKS" --delay 1 --rounds 1 --warmup 0 --ramp "$MANY_RAMP" --timeout "$HOLD" > "$3"
}
log "slow streams: $MANY through the gateway, $MANY_CHUNKS chunks 1 s apart, opened $MANY_RAMP/s"
before=$(cpu_ticks "$GWPID")
sample_rss "$GWPID" "$HOLD" "$OUT/rss-many.kb" &
sampler=$!
started=$(date +%s.%N)
slow_streams "$GW" "$MANY" "$OUT/streams-many.json"
ended=$(date +%s.%N)
after=$(cpu_ticks "$GWPID")
kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
metric many_gw_cpu_s "$(awk -v a="$after" -v b="$before" -v c="$CLK" 'BEGIN{print (a-b)/c}')"
metric many_wall_s "$(awk -v a="$ended" -v b="$started" 'BEGIN{print a-b}')"
metric many_rss_kb "$(cat "$OUT/rss-many.kb" 2>/dev/null || echo 0)"

# --- 8b. the same slow streams through two gateway processes on one port --------
# One process per core on a reuseport: endpoint (README): the kernel spreads
# the connections, so each process holds about half of the descriptors.
# Both share one database, configured once through the first's Admin API;
# the second serves once its change feed has loaded that configuration.
if [ "${BENCH_TWO_PROCESSES:-1}" = 1 ]; then
    TWO=${BENCH_STREAMS:-$([ "$QUICK" = 1 ] && echo 2000 || echo 10000)}
    log "slow streams: $TWO through two gateway processes on one reuseport port"
    RP_PIDS=()
    for n in 1 2; do
        admin_port=$((RP_ADMIN + n - 1))
        start "gw-rp$n" taskset -c $((2 - n)) "$TWISTD" -n --pidfile "$OUT/twistd-rp$n.pid" \
            --logfile "$OUT/gateway-rp$n.log" aigateway \
            --proxy "reuseport:$RP_GW:interface=127.0.0.1:backlog=$GW_BACKLOG" \
            --admin "tcp:$admin_port:interface=127.0.0.1" --database "$OUT/gateway-rp.db"
        eval "RP_PIDS+=(\$PID_gw_rp$n)"
        wait_http "http://127.0.0.1:$admin_port/status" "aigateway (reuseport $n) Admin API" 30
    done
    admin "$RP_ADMIN" /upstreams name=sse
    admin "$RP_ADMIN" /upstreams/sse/targets "target=127.0.0.1:$SSE" weight=100
    admin "$RP_ADMIN" /services name=sse host=sse
    admin "$RP_ADMIN" /services/sse/routes 'paths[]=/sse' strip_path=false
    # The second process's proxy serves the route after its change feed's
    # next look (--db-update-frequency, 1 s): wait until it has.
    deadline=$((SECONDS + 10))
    until grep -q "configuration version 4 loaded from the store" "$OUT/gateway-rp2.log" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || die "the second reuseport process did not load the shared configuration"
        sleep 0.1
    done
    wait_http "http://127.0.0.1:$RP_GW/sse/x?chunks=1&delay=0" "aigateway (reuseport) SSE route" 20
    HOLD=$(( TWO / MANY_RAMP + MANY_CHUNKS + 20 ))
    before=$(( $(cpu_ticks "${RP_PIDS[0]}") + $(cpu_ticks "${RP_PIDS[1]}") ))
    sample_rss "${RP_PIDS[0]}" "$HOLD" "$OUT/rss-rp1.kb" &
    s1=$!
    sample_rss "${RP_PIDS[1]}" "$HOLD" "$OUT/rss-rp2.kb" &
    s2=$!
    started=$(date +%s.%N)
    slow_streams "$RP_GW" "$TWO" "$OUT/streams-two.json"
    ended=$(date +%s.%N)
    after=$(( $(cpu_ticks "${RP_PIDS[0]}") + $(cpu_ticks "${RP_PIDS[1]}") ))
    kill "$s1" "$s2" 2>/dev/null || true; wait "$s1" "$s2" 2>/dev/null || true
    metric two_gw_cpu_s "$(awk -v a="$after" -v b="$before" -v c="$CLK" 'BEGIN{print (a-b)/c}')"
    metric two_wall_s "$(awk -v a="$ended" -v b="$started" 'BEGIN{print a-b}')"
    metric two_rss1_kb "$(cat "$OUT/rss-rp1.kb" 2>/dev/null || echo 0)"
    metric two_rss2_kb "$(cat "$OUT/rss-rp2.kb" 2>/dev/null || echo 0)"
    # Connections each process took (its own counter, not the client's view).
    for n in 1 2; do
        metric "two_accepted$n" "$(curl -s "http://127.0.0.1:$((RP_ADMIN + n - 1))/metrics" \
            | awk '/^aigateway_http_requests_total\{/ {s += $2} END {print s + 0}')"
    done
    stop_pid "${RP_PIDS[0]}"
    stop_pid "${RP_PIDS[1]}"
fi

# --- 11. instructions per request under callgrind ---------------------------------
# CPU time per request moves by +-20 % with what else the machine runs; the
# instructions a process executes for the same requests do not (callgrind
# counts them in user space only: system calls' kernel work is not in it).
# Each server runs in a fresh process under valgrind, warmed up, and counts
# only while IR_REQUESTS requests (hey, 10 connections) go through.
count_ir() { # name pid port: instructions per request, as metric ir_NAME
    local name=$1 pid=$2 url="http://127.0.0.1:$3/v1/chat/completions" total
    taskset -c 0 hey -n 500 -c 10 -m POST -T application/json -D "$OUT/body.json" "$url" > /dev/null
    callgrind_control -i on "$pid" > /dev/null
    taskset -c 0 hey -n "$IR_REQUESTS" -c 10 -m POST -T application/json -D "$OUT/body.json" "$url" > "$OUT/hey-ir-$name.txt"
    callgrind_control -i off "$pid" > /dev/null
    callgrind_control -d "$pid" > /dev/null
    total=$(cat "$OUT"/callgrind-"$name".out.* 2>/dev/null | awk '/^totals:/{s += $2} END{print s + 0}')
    grep -q "\[200\].*$IR_REQUESTS responses" "$OUT/hey-ir-$name.txt" || log "callgrind $name: not every request answered 200"
    metric "ir_$name" "$((total / IR_REQUESTS))"
    stop_pid "$pid"
}
under_callgrind() { # name command...: start it under callgrind on CPU 1, instrumentation off
    # (taskset execs valgrind, so the PID is valgrind's, which callgrind_control
    # addresses; valgrind does not follow an exec, so it must come last.)
    local name=$1; shift
    start "ir-$name" taskset -c 1 valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$OUT/callgrind-$name.out" "$@"
}
if [ "$IR_REQUESTS" -gt 0 ] && command -v callgrind_control >/dev/null; then
    log "instructions per request under callgrind: $IR_REQUESTS requests each"
    {
        nginx_common ir-target | sed 's/^master_process on;/master_process off;/'
        cat <<EOF
    server {
        listen 127.0.0.1:$IR_TARGET backlog=4096;
        location / { default_type application/json; return 200 '$CHAT_JSON'; }
    }
}
EOF
    } > "$OUT/nginx-ir-target.conf"
    {
        nginx_common ir-proxy | sed 's/^master_process on;/master_process off;/'
        cat <<EOF
    upstream chat { server 127.0.0.1:$T1; server 127.0.0.1:$T2; keepalive 128; }
    server {
        listen 127.0.0.1:$IR_NGX backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / { proxy_pass http://chat; }
    }
}
EOF
    } > "$OUT/nginx-ir-proxy.conf"
    under_callgrind direct nginx -p "$OUT" -c "$OUT/nginx-ir-target.conf"
    wait_http "http://127.0.0.1:$IR_TARGET/" "nginx target under callgrind" 60
    count_ir direct "$PID_ir_direct" "$IR_TARGET"
    under_callgrind nginx nginx -p "$OUT" -c "$OUT/nginx-ir-proxy.conf"
    wait_http "http://127.0.0.1:$IR_NGX/health" "nginx proxy under callgrind" 60
    count_ir nginx "$PID_ir_nginx" "$IR_NGX"
    under_callgrind gateway "$PY" "$TWISTD" -n --pidfile "$OUT/twistd-ir.pid" \
        --logfile "$OUT/gateway-ir.log" aigateway --proxy "tcp:$IR_GW:interface=127.0.0.1:backlog=$GW_BACKLOG" \
        --admin "tcp:$IR_ADMIN:interface=127.0.0.1" --database "$OUT/gateway-ir.db"
    wait_http "http://127.0.0.1:$IR_ADMIN/status" "aigateway under callgrind" 120
    configure_chat "$IR_ADMIN"
    wait_http "http://127.0.0.1:$IR_GW/health" "aigateway under callgrind, proxy route" 60
    count_ir gateway "$PID_ir_gateway" "$IR_GW"
    metric ir_requests "$IR_REQUESTS"
else
    log "callgrind unavailable or BENCH_IR_REQUESTS=0: no instruction counts"
fi

# --- 9. report --------------------------------------------------------------------
metric gw_rss_end_kb "$(rss_kb "$GWPID")"
metric loadavg_end "\"$(cut -d' ' -f1-3 /proc/loadavg)\""
COMMAND="make bench"
[ "$QUICK" = 1 ] && COMMAND="BENCH_QUICK=1 make bench"
COMMAND=${BENCH_COMMAND:-$COMMAND (bash bench/run.sh)}
RESULTS=$BENCH/RESULTS.md
[ "${BENCH_NO_RESULTS:-0}" = 1 ] && RESULTS=$OUT/RESULTS.md
"$PY" "$BENCH/report.py" --out "$OUT" --results "$RESULTS" --command "$COMMAND" \
    --duration "$DURATION" --quick "$QUICK"
log "done: report appended to $RESULTS, logs in $OUT"
