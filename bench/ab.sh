#!/usr/bin/env bash
# Interleaved A/B runs of two commits of the gateway: CPU per request.
#
#   bash bench/ab.sh REV_A REV_B [PAIRS]      (e.g. bench/ab.sh f4ebb75 HEAD 8)
#
# CPU time per request on a shared machine moves by +-20 % from one minute
# to the next, so comparing two commits run minutes apart says little.  This
# runs them in turn, PAIRS times (8 by default), each in a fresh gateway
# process and database pinned to CPU 1, under the same wrk load as
# bench/run.sh (1 thread on CPU 0, 50 keep-alive connections, POST chat,
# 2 s warm-up then 8 s measured) against two nginx targets, and prints the
# CPU µs per request (utime+stime of the gateway over the measured run) of
# every run and the median of each commit.  Each commit is checked out in a
# git worktree under bench/out/ab/ with a venv of its own.  Everything it
# starts is stopped by PID on exit; traffic stays on 127.0.0.1.
#
# Environment: AB_PORT_BASE (18300; 4 ports from it), AB_DURATION (8 s).

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || { echo "usage: bash bench/ab.sh REV_A REV_B [PAIRS]" >&2; exit 2; }
PAIRS=${3:-8}
BASE=${AB_PORT_BASE:-18300}
DURATION=${AB_DURATION:-8}
T1=$BASE; T2=$((BASE + 1)); GW=$((BASE + 2)); ADMIN=$((BASE + 3))
OUT=$ROOT/bench/out/ab
mkdir -p "$OUT"
for tool in wrk nginx taskset curl; do
    command -v "$tool" >/dev/null || { echo "needs $tool (make bench installs it)" >&2; exit 1; }
done

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# One worktree and venv per commit (kept for the next comparison).
tree_of() { # rev -> directory with .venv
    local sha dir
    sha=$(git -C "$ROOT" rev-parse --short "$1")
    dir=$OUT/tree-$sha
    if [ ! -d "$dir" ]; then
        git -C "$ROOT" worktree add --detach -q "$dir" "$sha"
    fi
    if [ ! -x "$dir/.venv/bin/twistd" ]; then
        python3 -m venv "$dir/.venv"
        "$dir/.venv/bin/pip" install -q -e "$dir" > /dev/null
    fi
    echo "$dir"
}
A=$(tree_of "$1")
B=$(tree_of "$2")
NAME_A="$1 ($(git -C "$ROOT" rev-parse --short "$1"))"
NAME_B="$2 ($(git -C "$ROOT" rev-parse --short "$2"))"

CHAT_JSON='{"id":"chatcmpl-9bench0000000000000000000001","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"A reverse proxy keeps connections to its targets alive so that each request skips the TCP handshake and slow start, which cuts latency and CPU on both sides.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":41,"completion_tokens":33,"total_tokens":74,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp_bench0001"}'
mkdir -p "$OUT/nginx"
{
    cat <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $OUT/nginx/body;
    proxy_temp_path $OUT/nginx/proxy;
    keepalive_requests 1000000;
    tcp_nodelay on;
EOF
    for port in $T1 $T2; do
        echo "    server { listen 127.0.0.1:$port backlog=4096; location / { default_type application/json; return 200 '$CHAT_JSON'; } }"
    done
    echo "}"
} > "$OUT/nginx.conf"
nginx -p "$OUT" -c "$OUT/nginx.conf" > "$OUT/nginx.out" 2>&1 &
PIDS+=("$!")

wait_http() { # url
    for _ in $(seq 200); do curl -sf -o /dev/null --max-time 2 "$1" && return 0; sleep 0.1; done
    echo "not ready: $1" >&2; exit 1
}
wait_http "http://127.0.0.1:$T1/"
wait_http "http://127.0.0.1:$T2/"

cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

one() { # tree -> "CPU-us-per-request requests-per-s"
    local tree=$1 pid before after out requests
    rm -f "$OUT"/gw.db*
    PYTHONPATH=$tree taskset -c 1 "$tree/.venv/bin/twistd" -n --pidfile "$OUT/gw.pid" \
        --logfile "$OUT/gw.log" aigateway --proxy "tcp:$GW:interface=127.0.0.1:backlog=4096" \
        --admin "tcp:$ADMIN:interface=127.0.0.1" --database "$OUT/gw.db" &
    pid=$!
    wait_http "http://127.0.0.1:$ADMIN/status"
    local admin=http://127.0.0.1:$ADMIN
    curl -sf -o /dev/null "$admin/upstreams" -d name=chat
    curl -sf -o /dev/null "$admin/upstreams/chat/targets" -d "target=127.0.0.1:$T1" -d weight=100
    curl -sf -o /dev/null "$admin/upstreams/chat/targets" -d "target=127.0.0.1:$T2" -d weight=100
    curl -sf -o /dev/null "$admin/services" -d name=chat -d host=chat
    curl -sf -o /dev/null "$admin/services/chat/routes" -d 'paths[]=/' -d strip_path=false
    local url=http://127.0.0.1:$GW/v1/chat/completions
    wait_http "$url"
    taskset -c 0 wrk -t1 -c50 -d2s -s "$ROOT/bench/chat.lua" "$url" > /dev/null
    before=$(cpu_ticks "$pid")
    out=$(taskset -c 0 wrk -t1 -c50 -d"${DURATION}s" -s "$ROOT/bench/chat.lua" "$url" | grep WRKJSON)
    after=$(cpu_ticks "$pid")
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    requests=$(echo "$out" | sed 's/.*"requests":\([0-9]*\).*/\1/')
    awk -v t=$((after - before)) -v n="$requests" -v hz="$(getconf CLK_TCK)" -v d="$DURATION" \
        'BEGIN { printf "%.1f %d\n", t * 1e6 / hz / n, n / d }'
}

median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

echo "| pair | $NAME_A µs/request (req/s) | $NAME_B µs/request (req/s) |"
echo "|---:|---:|---:|"
: > "$OUT/a.txt"; : > "$OUT/b.txt"
for pair in $(seq "$PAIRS"); do
    read -r a_us a_rps < <(one "$A")
    read -r b_us b_rps < <(one "$B")
    echo "$a_us" >> "$OUT/a.txt"; echo "$b_us" >> "$OUT/b.txt"
    echo "| $pair | $a_us ($a_rps) | $b_us ($b_rps) |"
done
echo "| median | $(median < "$OUT/a.txt") | $(median < "$OUT/b.txt") |"
