#!/usr/bin/env bash
# Run N aiwfd instances behind nginx on loopback, the way production runs
# aiwfd@.service behind deploy/nginx/aiwfd.conf. For local use: everything
# lives in a temporary directory and stops on Ctrl-C or exit.
#
#   scripts/cluster.sh --mock                     # 3 instances, nginx on :8080
#   scripts/cluster.sh --instances 2 -f agents.yaml --env-file .env
#   curl -s localhost:8080/agents
#   kill -USR1 <cluster.sh pid>                   # rolling restart, back to back
set -euo pipefail

usage() {
    cat <<'EOF'
usage: cluster.sh [--instances N] [--base-port PORT] [--port PORT] [-f FILE]
                  [--env-file FILE] [--mock] [--aiwfd "CMD"] [--keep]
                  [-- EXTRA AIWFD ARGS]

  --instances N     aiwfd instances to start (default 3)
  --base-port PORT  first instance's port; the others follow (default 8081)
  --port PORT       nginx's port on 127.0.0.1 (default 8080)
  -f FILE           the agents file (default: config.yaml, else
                    config.example.yaml, in the current directory or the repo)
  --env-file FILE   passed to every instance
  --mock            passed to every instance: no key, no network
  --aiwfd "CMD"     how to run aiwfd (default: `aiwfd` from PATH, else
                    `python3 -m aiwfd` from this repository); env AIWFD too
  --keep            keep the temporary directory (logs, nginx.conf) at exit
  -- ARGS           passed to every `aiwfd serve`

SIGUSR1 restarts every instance, one after the other with no pause, as
`for p in ...; do systemctl restart aiwfd@$p; done` does: SIGTERM, the drain,
start again on the same port; the next one as soon as this one listens.
nginx (deploy/nginx/aiwfd.conf, max_fails=0) loses no request meanwhile.
EOF
}

say() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { printf 'cluster.sh: error: %s\n' "$*" >&2; exit 1; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$script_dir")
instances=3
base_port=8081
nginx_port=8080
config=""
env_file=""
mock=0
keep=0
aiwfd_cmd=${AIWFD:-}
extra=()

while [ $# -gt 0 ]; do
    case "$1" in
        --instances|-n) instances=$2; shift 2 ;;
        --base-port) base_port=$2; shift 2 ;;
        --port|-p) nginx_port=$2; shift 2 ;;
        -f|--file) config=$2; shift 2 ;;
        --env-file) env_file=$2; shift 2 ;;
        --mock) mock=1; shift ;;
        --aiwfd) aiwfd_cmd=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

is_uint() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }
if ! is_uint "$instances" || [ "$instances" -lt 1 ]; then die "--instances must be >= 1"; fi
if ! is_uint "$base_port" || ! is_uint "$nginx_port"; then die "ports must be numbers"; fi
[ $((base_port + instances - 1)) -le 65535 ] || die "ports past 65535"
if [ "$nginx_port" -ge "$base_port" ] && [ "$nginx_port" -lt $((base_port + instances)) ]; then
    die "nginx port $nginx_port collides with the instances' ports"
fi

if [ -z "$config" ]; then
    for c in config.yaml config.example.yaml "$repo/config.yaml" "$repo/config.example.yaml"; do
        if [ -f "$c" ]; then config=$c; break; fi
    done
    [ -n "$config" ] || die "no agents file: pass -f FILE"
fi
[ -f "$config" ] || die "agents file not found: $config"
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
if [ -n "$env_file" ]; then
    [ -f "$env_file" ] || die "env file not found: $env_file"
    env_file=$(cd "$(dirname "$env_file")" && pwd)/$(basename "$env_file")
fi

if [ -z "$aiwfd_cmd" ]; then
    if command -v aiwfd >/dev/null 2>&1; then
        aiwfd_cmd=aiwfd
    else
        aiwfd_cmd="python3 -m aiwfd"
        export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
# shellcheck disable=SC2206  # a command line given as one string
aiwfd=($aiwfd_cmd)

nginx_bin=$(command -v nginx || true)
[ -n "$nginx_bin" ] || [ ! -x /usr/sbin/nginx ] || nginx_bin=/usr/sbin/nginx
[ -n "$nginx_bin" ] || die "nginx not found (apt-get install nginx)"
template="$repo/deploy/nginx/aiwfd.conf"
[ -f "$template" ] || die "missing $template"

dir=$(mktemp -d "${TMPDIR:-/tmp}/aiwfd-cluster.XXXXXX")
pids=()
ports=()
nginx_pid=""

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$nginx_pid" ] && kill -0 "$nginx_pid" 2>/dev/null; then
        kill -QUIT "$nginx_pid" 2>/dev/null || true
    fi
    local i
    for i in "${!pids[@]}"; do
        kill -TERM "${pids[$i]}" 2>/dev/null || true
    done
    if [ "${#pids[@]}" -gt 0 ]; then
        say "stopping ${#pids[@]} instance(s) (they drain in-flight requests)..."
    fi
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" 2>/dev/null || true
    done
    if [ -n "$nginx_pid" ]; then
        wait "$nginx_pid" 2>/dev/null || true
    fi
    if [ "$keep" -eq 1 ]; then
        say "kept $dir"
    else
        rm -rf "$dir"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Own process groups for the children: Ctrl-C reaches this script only, and
# the instances get exactly one SIGTERM from cleanup (a second SIGINT would
# make them exit at once instead of draining).
set -m

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Instance i on its port, in the background; its log appended to (restarts).
start_instance() {
    local i=$1 port=${ports[$1]}
    local args=(serve -f "$config" -o "$dir/instance-$port" --host 127.0.0.1 -p "$port")
    [ "$mock" -eq 1 ] && args+=(--mock)
    [ -n "$env_file" ] && args+=(--env-file "$env_file")
    "${aiwfd[@]}" "${args[@]}" ${extra[@]+"${extra[@]}"} >>"$dir/aiwfd-$port.log" 2>&1 &
    pids[i]=$!
}

# Until instance i listens (what READY=1 means to systemd), or it gives up.
wait_listening() {
    local i=$1 port=${ports[$1]} t
    for ((t = 0; t < 300; t++)); do
        port_open "$port" && return 0
        if ! kill -0 "${pids[$i]}" 2>/dev/null; then
            tail -n 20 "$dir/aiwfd-$port.log" >&2 || true
            die "instance on port $port exited during start-up (log above)"
        fi
        sleep 0.1
    done
    die "instance on port $port did not listen within 30 s"
}

for ((i = 0; i < instances; i++)); do
    port=$((base_port + i))
    port_open "$port" && die "port $port is already in use"
    ports+=("$port")
    start_instance "$i"
done

# Wait until every instance listens (or one of them gives up).
for i in "${!pids[@]}"; do
    wait_listening "$i"
    say "aiwfd on 127.0.0.1:${ports[$i]} (pid ${pids[$i]}, log $dir/aiwfd-${ports[$i]}.log)"
done

# SIGUSR1: the rolling restart of the units' comment, back to back.
restart_requested=0
trap 'restart_requested=1' USR1
rolling_restart() {
    local i pid rc
    for i in "${!pids[@]}"; do
        pid=${pids[$i]}
        kill -TERM "$pid" 2>/dev/null || true
        rc=0
        wait "$pid" || rc=$?
        # A signal (another USR1) ends `wait` early: wait until it really exited.
        while kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done
        [ "$rc" -eq 0 ] || say "instance on port ${ports[$i]} exited $rc while stopping"
        start_instance "$i"
        wait_listening "$i"
        dead[i]=""
        say "restarted aiwfd on 127.0.0.1:${ports[$i]} (pid ${pids[$i]})"
    done
    say "rolling restart done"
}

# nginx.conf: the deploy example, with this cluster's upstream servers (each
# with the shipped server parameters, e.g. max_fails=0), a loopback listen
# and every path inside $dir.
port_open "$nginx_port" && die "port $nginx_port is already in use"
server_params=$(sed -n 's/^[[:space:]]*server 127\.0\.0\.1:[0-9][0-9]*\([^;]*\);.*/\1/p' "$template" | head -n 1)
servers=""
for port in "${ports[@]}"; do
    servers+="    server 127.0.0.1:$port$server_params;"$'\n'
done
awk -v servers="$servers" -v listen="    listen 127.0.0.1:$nginx_port;" -v logpath="$dir/access.log" '
    /^[[:space:]]*server 127\.0\.0\.1:[0-9]+/ { if (!done) { printf "%s", servers; done = 1 } next }
    /^[[:space:]]*listen \[::\]:80;/ { next }
    /^[[:space:]]*listen 80;/ { print listen; next }
    { gsub("/var/log/nginx/aiwfd.access.log", logpath); print }
' "$template" >"$dir/aiwfd.conf"

user_line=""
if [ "$(id -u)" -eq 0 ]; then
    # Workers drop to nobody; they need to reach the temp paths below $dir.
    user_line="user nobody $(id -gn nobody);"
    chmod 0755 "$dir"
fi
cat >"$dir/nginx.conf" <<EOF
# generated by scripts/cluster.sh from deploy/nginx/aiwfd.conf
$user_line
daemon off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log notice;
events { worker_connections 1024; }
http {
    client_body_temp_path $dir/client_body_temp;
    proxy_temp_path $dir/proxy_temp;
    fastcgi_temp_path $dir/fastcgi_temp;
    uwsgi_temp_path $dir/uwsgi_temp;
    scgi_temp_path $dir/scgi_temp;
    access_log $dir/access.log;
    include $dir/aiwfd.conf;
}
EOF

nginx_args=(-p "$dir" -c "$dir/nginx.conf")
# -e (nginx >= 1.19.5) keeps nginx away from /var/log/nginx/error.log too.
if "$nginx_bin" -h 2>&1 | grep -q -- '-e filename'; then
    nginx_args=(-e "$dir/error.log" "${nginx_args[@]}")
fi
"$nginx_bin" "${nginx_args[@]}" -t -q || die "nginx -t failed for $dir/nginx.conf"
"$nginx_bin" "${nginx_args[@]}" &
nginx_pid=$!
for ((t = 0; t < 100; t++)); do
    port_open "$nginx_port" && break
    kill -0 "$nginx_pid" 2>/dev/null || die "nginx exited; see $dir/error.log"
    sleep 0.1
done
port_open "$nginx_port" || die "nginx did not listen within 10 s"

say "nginx on 127.0.0.1:$nginx_port (pid $nginx_pid, conf $dir/nginx.conf)"
echo "http://127.0.0.1:$nginx_port/"
say "try: curl -s http://127.0.0.1:$nginx_port/agents"
say "rolling restart: kill -USR1 $$; Ctrl-C stops everything"

# Stay in the foreground; report instances that die (nginx routes around
# them), stop when nginx dies.
dead=()
while :; do
    if ! kill -0 "$nginx_pid" 2>/dev/null; then
        die "nginx exited; see $dir/error.log"
    fi
    if [ "$restart_requested" -eq 1 ]; then
        restart_requested=0
        say "rolling restart of ${#pids[@]} instance(s), back to back"
        rolling_restart
    fi
    for i in "${!pids[@]}"; do
        if [ -z "${dead[$i]:-}" ] && ! kill -0 "${pids[$i]}" 2>/dev/null; then
            dead[i]=1
            say "instance on port ${ports[$i]} exited; see $dir/aiwfd-${ports[$i]}.log"
        fi
    done
    sleep 1 &
    wait $! || true
done
