# Shared helpers for the benchmark scripts in tests/bench/ (sourced, not run).
#
# Environment:
#   INCFSD=PATH            daemon to measure (default <workspace>/target/release/incfsd)
#   CARGO_TARGET_DIR=DIR   where delay-proxy and guest-bench are built (default <workspace>/target)
#   BENCH_OUT=DIR          results (TSV, logs); default <workspace>/target/bench
#   BENCH_KEEP=1           keep the work directory (/tmp/incfs-bench-*)

ws=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
INCFSD=${INCFSD:-$ws/target/release/incfsd}
target_dir=${CARGO_TARGET_DIR:-$ws/target}
BENCH_OUT=${BENCH_OUT:-$ws/target/bench}
mkdir -p "$BENCH_OUT"

bench_pids=()
work=""

bench_cleanup() {
    local p
    for p in ${bench_pids[@]+"${bench_pids[@]}"}; do
        kill "$p" 2>/dev/null || true
    done
    for p in ${bench_pids[@]+"${bench_pids[@]}"}; do
        wait "$p" 2>/dev/null || true
    done
    bench_pids=()
    if [ -n "$work" ] && [ -z "${BENCH_KEEP:-}" ]; then
        rm -rf "$work"
    elif [ -n "$work" ]; then
        echo "kept work dir $work" >&2
    fi
}

bench_init() {  # NAME: creates $work, sets the exit trap
    work=$(mktemp -d "/tmp/incfs-bench-$1-XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

source "$(dirname "${BASH_SOURCE[0]}")/need.sh"

now() { printf '%s\n' "$EPOCHREALTIME"; }
# fsub A B -> A - B with 3 decimals; fdiv A B -> A / B with 2 decimals
fsub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
fdiv() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "inf"; else printf "%.2f", a / b }'; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
        echo $((20000 + RANDOM % 20000))
}

wait_port() {  # PORT WHAT
    local i
    for i in $(seq 1 500); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.02
    done
    die "$2 did not listen on port $1"
}

need_incfsd() {
    [ -x "$INCFSD" ] || die "no incfsd at $INCFSD: cargo build --release -p incfs-backend"
}

incfsd_has() {  # SUBCOMMAND FLAG: does this incfsd know FLAG?
    "$INCFSD" "$1" --help 2>&1 | grep -q -- "$2"
}

build_host_tools() {  # delay-proxy (native)
    (cd "$ws" && cargo build --release -q -p incfs-e2e --bin delay-proxy) || die "building delay-proxy failed"
    DELAY_PROXY=$target_dir/release/delay-proxy
}

build_guest_tools() {  # guest-bench (static, for the guest)
    (cd "$ws" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -q -p incfs-e2e \
        --bin guest-bench --target x86_64-unknown-linux-gnu --target-dir "$target_dir/guest-bench") ||
        die "building guest-bench failed"
    GUEST_BENCH=$target_dir/guest-bench/x86_64-unknown-linux-gnu/release/guest-bench
}

start_nginx() {  # ROOT: serves ROOT on a free port; sets NGINX_PORT, NGINX_DIR (access.log there)
    local root=$1 dir=$work/nginx-$RANDOM
    NGINX_DIR=$dir
    mkdir -p "$dir"
    NGINX_PORT=$(free_port)
    cat > "$dir/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1; error_log $dir/error.log warn; pid $dir/nginx.pid;
events { worker_connections 512; }
http {
  log_format counted '\$status \$body_bytes_sent \$uri';
  access_log $dir/access.log counted;
  client_body_temp_path $dir/t1; proxy_temp_path $dir/t2; fastcgi_temp_path $dir/t3; uwsgi_temp_path $dir/t4; scgi_temp_path $dir/t5;
  default_type application/octet-stream;
  keepalive_requests 100000;
  server { listen 127.0.0.1:$NGINX_PORT; root $root; location / { } }
}
EOF
    /usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf" </dev/null &
    bench_pids+=($!)
    wait_port "$NGINX_PORT" nginx
}

start_proxy() {  # TO_PORT RTT_MS MBIT: sets PROXY_PORT, PROXY_STATS_PORT, PROXY_PID
    PROXY_PORT=$(free_port)
    PROXY_STATS_PORT=$(free_port)
    "$DELAY_PROXY" --listen "127.0.0.1:$PROXY_PORT" --to "127.0.0.1:$1" --rtt-ms "$2" --mbit "$3" \
        --stats "127.0.0.1:$PROXY_STATS_PORT" 2>>"$work/proxy.log" &
    PROXY_PID=$!
    bench_pids+=($PROXY_PID)
    wait_port "$PROXY_PORT" delay-proxy
    wait_port "$PROXY_STATS_PORT" "delay-proxy stats"
}

proxy_stat() {  # NAME (up_bytes down_bytes connections)
    curl -s "http://127.0.0.1:$PROXY_STATS_PORT/" | awk -v k="$1" '$1 == k { print $2 }'
}

stop_pid() {  # PID: SIGTERM, wait
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# start_daemon SOCK STORE IMAGE CACHE LOG [extra flags...]: incfsd run with metrics on a
# free port; waits for its ready line. Sets DAEMON_PID, METRICS_PORT, DAEMON_T0 (start),
# DAEMON_READY (seconds from start to ready).
start_daemon() {
    local sock=$1 store=$2 image=$3 cache=$4 logf=$5
    shift 5
    METRICS_PORT=$(free_port)
    rm -f "$sock"
    DAEMON_T0=$(now)
    INCFS_LOG=${INCFS_LOG:-warn,incfs_fuse::dispatch=trace} "$INCFSD" run --socket "$sock" --store "$store" \
        --image "$image" --cache "$cache" --metrics "127.0.0.1:$METRICS_PORT" "$@" </dev/null >/dev/null 2>"$logf" &
    DAEMON_PID=$!
    bench_pids+=($DAEMON_PID)
    local i
    for i in $(seq 1 3000); do
        if grep -q "serving image" "$logf" 2>/dev/null; then
            DAEMON_READY=$(fsub "$(now)" "$DAEMON_T0")
            return 0
        fi
        kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$logf" >&2; die "incfsd run exited"; }
        sleep 0.01
    done
    cat "$logf" >&2
    die "incfsd run did not become ready"
}

# vm_hwm_kb PID: peak resident memory (VmHWM, kB) of PID plus its children's (a supervisor and
# its worker), read from /proc while they run; then the largest of them alone.
# cpu_s PID: CPU seconds (user + system) PID and its children have used so far.
cpu_s() {
    local p ticks=0 t
    for p in "$1" $(ps -o pid= --ppid "$1" 2>/dev/null); do
        t=$(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || true)
        ticks=$((ticks + ${t:-0}))
    done
    awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}

vm_hwm_kb() {
    local p sum=0 max=0 kb
    for p in "$1" $(ps -o pid= --ppid "$1" 2>/dev/null); do
        kb=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$p/status" 2>/dev/null || true)
        kb=${kb:-0}
        sum=$((sum + kb))
        [ "$kb" -gt "$max" ] && max=$kb
    done
    echo "$sum $max"
}

metrics() {  # -> "name value" lines
    curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | grep -v '^#'
}

metric() {  # FILE NAME -> value (0 if absent)
    awk -v k="$2" '$1 == k { v = $2 } END { print v + 0 }' "$1"
}

# FUSE opcode counts from the daemon's trace log: "READ LOOKUP GETATTR OPEN READDIRPLUS" ...
fuse_ops() {  # LOG
    sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -o 'opcode=[0-9]*' | sort | uniq -c |
        awk '{ split($2, a, "="); n[a[2]] = $1 }
             END { printf "READ=%d LOOKUP=%d GETATTR=%d OPEN=%d READDIRPLUS=%d READLINK=%d ALL=%d\n",
                   n[15], n[1], n[3], n[14], n[44], n[5], tot() }
             function tot(  s, k) { s = 0; for (k in n) s += n[k]; return s }'
}

# run_guest LOG [run-vm args...]: boots a guest; writes its console to LOG with a host
# timestamp before each line ("EPOCH<TAB>line"). Hook: if the function on_console_line is
# defined it is called with (epoch, line) for each line.
run_guest() {
    local logf=$1
    shift
    "$ws/qemu/setup" >/dev/null || die "qemu/setup failed"
    local status=0
    { "$ws/qemu/run-vm" "$@" || status=$?; echo "RUNVM-STATUS=$status"; } 2>&1 | while IFS= read -r line; do
        line=${line%$'\r'}
        local t=$EPOCHREALTIME
        printf '%s\t%s\n' "$t" "$line" >> "$logf"
        if declare -F on_console_line >/dev/null; then on_console_line "$t" "$line"; fi
        [ -n "${BENCH_VERBOSE:-}" ] && printf 'guest| %s\n' "$line" >&2
        true
    done
    local st
    st=$(grep -ao 'RUNVM-STATUS=[0-9]*' "$logf" | tail -1)
    st=${st#RUNVM-STATUS=}
    [ "$st" = 0 ] || { tail -30 "$logf" >&2; die "guest run failed (run-vm status $st), console in $logf"; }
}

console_field() {  # LOG KEY -> the word after "KEY " on the guest console (last occurrence)
    tr -d '\r' < "$1" | cut -f2- | awk -v k="$2" '{ for (i = 1; i < NF; i++) if ($i == k) v = $(i + 1) } END { print v }'
}

console_time() {  # LOG KEY -> host epoch of the line holding KEY
    tr -d '\r' < "$1" | awk -F'\t' -v k="$2" 'index($2, k) { print $1; exit }'
}
