#!/usr/bin/env bash
# The whole flow in one command (`make demo`):
#   1. Postgres and RabbitMQ: used as they are if they answer, else started with docker compose
#      (and stopped again at the end);
#   2. release build;
#   3. txoutbox-server and txoutbox-consumer in the background, logs in target/demo/;
#   4. txoutbox-stress: ORDERS orders (default 10000) at CONCURRENCY (default 32), then it
#      verifies that every order is COMPLETED and was applied exactly once;
#   5. server and consumer stopped (also on failure or Ctrl-C).
# Exits with txoutbox-stress's status.
#
# Environment: ORDERS, CONCURRENCY, STRESS_TIMEOUT (seconds, passed as --timeout),
# SERVER_START_TIMEOUT (seconds, default 60), and every setting the binaries read
# (DATABASE_URL, AMQP_URL, HTTP_ADDR, ...; see docs/operating.md).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ORDERS="${ORDERS:-10000}"
CONCURRENCY="${CONCURRENCY:-32}"
SERVER_START_TIMEOUT="${SERVER_START_TIMEOUT:-60}"
export HTTP_ADDR="${HTTP_ADDR:-127.0.0.1:8080}"

DEFAULT_DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/txoutbox"
DEFAULT_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"
COMPOSE_AMQP_URL="amqp://txoutbox:txoutbox@127.0.0.1:5672/%2f"

TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET_DIR/release"
LOG_DIR="$TARGET_DIR/demo"

say() { printf 'demo: %s\n' "$*"; }
die() {
    printf 'demo: error: %s\n' "$*" >&2
    exit 1
}

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() {
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# url_host_port URL DEFAULT_PORT: prints "host port" of a scheme://user:pass@host:port/... URL
# (nothing for another form, such as a key=value Postgres string: it is then not checked).
url_host_port() {
    [[ "$1" == *://* ]] || return 0
    local rest="${1#*://}"
    rest="${rest%%[/?]*}"
    rest="${rest##*@}"
    local host="${rest%:*}" port="${rest##*:}"
    if [[ "$rest" != *:* ]]; then
        host="$rest"
        port="$2"
    fi
    printf '%s %s\n' "${host:-127.0.0.1}" "$port"
}

compose() { docker compose "$@"; }

SERVER_PID=""
CONSUMER_PID=""
STARTED_SERVICES=()

stop_process() { # PID NAME
    local pid="$1" name="$2"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name did not stop within 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_process "$SERVER_PID" txoutbox-server
    stop_process "$CONSUMER_PID" txoutbox-consumer
    if ((${#STARTED_SERVICES[@]} > 0)); then
        say "stopping the containers this run started: ${STARTED_SERVICES[*]}"
        compose rm --stop --force "${STARTED_SERVICES[@]}" >/dev/null 2>&1 ||
            say "could not stop them; run: docker compose down"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 0. The API's port must be free (before building or starting anything).
http_host="${HTTP_ADDR%:*}"
http_port="${HTTP_ADDR##*:}"
[[ "$http_host" == "0.0.0.0" ]] && http_host=127.0.0.1
BASE_URL="http://$http_host:$http_port"
if port_open "$http_host" "$http_port"; then
    die "something already listens on $http_host:$http_port (another txoutbox-server?); stop it or set HTTP_ADDR"
fi

# 1. Services. A URL set by the caller must already answer; the default ones may be started.
pg_host="" pg_port="" mq_host="" mq_port=""
read -r pg_host pg_port < <(url_host_port "${DATABASE_URL:-$DEFAULT_DATABASE_URL}" 5432) || true
read -r mq_host mq_port < <(url_host_port "${AMQP_URL:-$DEFAULT_AMQP_URL}" 5672) || true
missing=()
if [[ -n "$pg_host" ]] && ! port_open "$pg_host" "$pg_port"; then
    [[ -z "${DATABASE_URL:-}" ]] || die "Postgres does not answer at $pg_host:$pg_port (from DATABASE_URL)"
    missing+=(postgres)
fi
if [[ -n "$mq_host" ]] && ! port_open "$mq_host" "$mq_port"; then
    [[ -z "${AMQP_URL:-}" ]] || die "RabbitMQ does not answer at $mq_host:$mq_port (from AMQP_URL)"
    missing+=(rabbitmq)
fi
if ((${#missing[@]} > 0)); then
    compose version >/dev/null 2>&1 ||
        die "not answering on 127.0.0.1: ${missing[*]}; and 'docker compose' is not available to start them. Start them yourself, or install Docker (see README.md)"
    say "not answering: ${missing[*]}; starting them with docker compose"
    STARTED_SERVICES=("${missing[@]}")
    compose up -d --wait "${missing[@]}"
    if [[ " ${missing[*]} " == *" rabbitmq "* ]]; then
        export AMQP_URL="$COMPOSE_AMQP_URL" # docker-compose.yml's own account, not guest
    fi
fi
say "Postgres and RabbitMQ answer"

# 2. Build.
say "building the release binaries"
cargo build --release --workspace --bins
for bin in txoutbox txoutbox-server txoutbox-consumer txoutbox-stress; do
    [[ -x "$BIN/$bin" ]] || die "$BIN/$bin was not built"
done

# The binaries check the schema and never change it: create the database and migrate first.
say "creating the database if needed and applying the migrations"
"$BIN/txoutbox" migrate --create-database

# 3. Server and consumer.
mkdir -p "$LOG_DIR"
"$BIN/txoutbox-consumer" >"$LOG_DIR/consumer.log" 2>&1 &
CONSUMER_PID=$!
"$BIN/txoutbox-server" >"$LOG_DIR/server.log" 2>&1 &
SERVER_PID=$!
say "started txoutbox-server (pid $SERVER_PID) and txoutbox-consumer (pid $CONSUMER_PID); logs in $LOG_DIR/"

probe="$BASE_URL/orders/00000000-0000-0000-0000-000000000000"
deadline=$((SECONDS + SERVER_START_TIMEOUT))
until [[ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$probe" || true)" == 404 ]]; do
    for pair in "$SERVER_PID:server" "$CONSUMER_PID:consumer"; do
        if ! kill -0 "${pair%%:*}" 2>/dev/null; then
            tail -n 20 "$LOG_DIR/${pair#*:}.log" >&2 || true
            die "txoutbox-${pair#*:} exited during start-up (log above: $LOG_DIR/${pair#*:}.log)"
        fi
    done
    ((SECONDS < deadline)) || die "the server did not answer $probe within ${SERVER_START_TIMEOUT} s"
    sleep 0.2
done
say "server answers at $BASE_URL"

# 4. Load and verification.
stress_args=(--url "$BASE_URL" --orders "$ORDERS" --concurrency "$CONCURRENCY")
[[ -n "${STRESS_TIMEOUT:-}" ]] && stress_args+=(--timeout "$STRESS_TIMEOUT")
say "running txoutbox-stress ${stress_args[*]}"
echo
set +e
"$BIN/txoutbox-stress" "${stress_args[@]}" 2>&1 | tee "$LOG_DIR/stress.log"
status=${PIPESTATUS[0]}
set -e
echo

for name in server consumer; do
    problems=$(grep -cE ' (WARN|ERROR) ' "$LOG_DIR/$name.log" || true)
    say "txoutbox-$name logged $problems warning/error line(s) ($LOG_DIR/$name.log)"
done
if ((status == 0)); then
    say "PASSED: $ORDERS orders created, published, consumed and verified"
else
    say "FAILED: txoutbox-stress exited with status $status (logs in $LOG_DIR/)"
fi
exit "$status"
