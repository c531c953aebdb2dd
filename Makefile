# txoutbox: `make help` lists the targets.
#
# Settings reach the binaries through the environment (see docs/operating.md, or any binary's --help):
#   make server RELAY_WORKERS=8      # a make variable given on the command line is exported too
#   make stress ORDERS=1000 CONCURRENCY=16

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO       ?= cargo
COMPOSE     ?= docker compose
ORDERS      ?= 10000
CONCURRENCY ?= 32
STRESS_URL  ?= http://127.0.0.1:8080
BENCH_ARGS  ?=
CHAOS_ARGS  ?=

# `make up` writes this file and `make down` removes it. While it exists, every target runs
# with the accounts of docker-compose.yml (unless AMQP_URL / DATABASE_URL are already set):
# RabbitMQ's own user instead of guest, Postgres with its password (the binaries' default
# DATABASE_URL; the tests' default has no password, which the container's Postgres refuses),
# and scripts/compose/rabbitmqctl first on PATH (it runs rabbitmqctl inside the container).
COMPOSE_ENV := target/compose.env
COMPOSE_AMQP_URL := amqp://txoutbox:txoutbox@127.0.0.1:5672/%2f
COMPOSE_DATABASE_URL := postgres://postgres:postgres@127.0.0.1:5432/txoutbox
-include $(COMPOSE_ENV)

.PHONY: help up down build migrate server consumer stress demo bench bench-quick soak soak-quick pg-stat-statements chaos chaos-quick test library-check fmt lint

help: ## list the targets (the default)
	@echo "txoutbox: transactional outbox for Postgres and RabbitMQ"
	@echo
	@echo "On a fresh machine: make demo (the whole flow under load), make test (every test)."
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  make %-12s %s\n", $$1, $$2}' \
		$(firstword $(MAKEFILE_LIST))
	@echo
	@echo "Variables: ORDERS=$(ORDERS) CONCURRENCY=$(CONCURRENCY) STRESS_URL=$(STRESS_URL) (stress, demo)"
	@echo "           BENCH_ARGS='$(BENCH_ARGS)' (bench: --quick --concurrency C --out DIR --backlogs N,N,...)"
	@echo "           CHAOS_ARGS='$(CHAOS_ARGS)' (chaos: --quick --only CASE,... --out DIR)"

up: ## start Postgres 15 and RabbitMQ 3 in Docker, wait until healthy
	$(COMPOSE) up -d --wait
	@mkdir -p $(dir $(COMPOSE_ENV))
	@printf '%s\n' '# Written by `make up`, removed by `make down`.' \
		'AMQP_URL ?= $(COMPOSE_AMQP_URL)' 'export AMQP_URL' \
		'DATABASE_URL ?= $(COMPOSE_DATABASE_URL)' 'export DATABASE_URL' \
		'export PATH := $(CURDIR)/scripts/compose:$$(PATH)' > $(COMPOSE_ENV)
	@echo "Services up; make targets now use AMQP_URL=$(COMPOSE_AMQP_URL)"
	@echo "Outside make: export AMQP_URL='$(COMPOSE_AMQP_URL)'"

down: ## stop and remove the containers of `make up` (the data volumes stay)
	$(COMPOSE) down
	@rm -f $(COMPOSE_ENV)

build: ## build the release binaries
	$(CARGO) build --release --workspace --bins

migrate: ## create the database if missing, apply the library's migrations and the orders table
	$(CARGO) run --release --bin txoutbox -- migrate --create-database

server: migrate ## run txoutbox-server (HTTP API on 127.0.0.1:8080 + relay)
	$(CARGO) run --release --bin txoutbox-server

consumer: migrate ## run txoutbox-consumer (marks orders COMPLETED)
	$(CARGO) run --release --bin txoutbox-consumer

stress: ## load the running server and verify every order: make stress ORDERS=1000 CONCURRENCY=16
	$(CARGO) run --release --bin txoutbox-stress -- \
		--url $(STRESS_URL) --orders $(ORDERS) --concurrency $(CONCURRENCY)

demo: ## services (Docker if absent), server, consumer, stress, verification: one command
	ORDERS=$(ORDERS) CONCURRENCY=$(CONCURRENCY) bash scripts/demo.sh

# The benchmark runs the release binaries next to it, so everything is built first. GNU make
# cannot take `make bench --quick`: use `make bench-quick` or `make bench BENCH_ARGS=--quick`.
bench: ## ceilings and txoutbox in one run, verified, ratios (~5 min): make bench BENCH_ARGS="--concurrency 64"
	$(CARGO) build --release --workspace --bins
	"$${CARGO_TARGET_DIR:-target}/release/txoutbox-bench" $(BENCH_ARGS)

bench-quick: ## the benchmark's one-minute smoke run (make bench BENCH_ARGS=--quick)
	$(MAKE) --no-print-directory bench BENCH_ARGS="--quick $(BENCH_ARGS)"

# The soak: the release server and consumer at half the capacity measured at its start, judged
# for throughput, p99, table sizes and server RSS staying level (docs/performance.md).
soak: ## 30 minutes at half capacity, per-minute throughput/p99/table sizes/RSS, judged: make soak BENCH_ARGS="--concurrency 64"
	$(CARGO) build --release --workspace --bins
	"$${CARGO_TARGET_DIR:-target}/release/txoutbox-bench" --soak $(BENCH_ARGS)

soak-quick: ## the soak's 3-minute form (10-second points), as CI runs it
	$(MAKE) --no-print-directory soak BENCH_ARGS="--quick $(BENCH_ARGS)"

# The bench counts statements per order with pg_stat_statements, which Postgres loads only at
# start (shared_preload_libraries). This adds it to the local cluster's list and restarts the
# cluster (pg_ctlcluster): do not run it while anything else uses that Postgres.
PG_ADMIN_URL ?= $(if $(DATABASE_URL),$(DATABASE_URL),postgres://postgres@127.0.0.1:5432/postgres)
pg-stat-statements: ## load pg_stat_statements into the local Postgres (RESTARTS it) so the bench counts statements
	@current="$$(psql "$(PG_ADMIN_URL)" -XAtc 'SHOW shared_preload_libraries')"; \
	if [[ ",$${current// /}," == *",pg_stat_statements,"* ]]; then \
		echo "pg_stat_statements is already loaded ($$current)"; exit 0; fi; \
	wanted="$${current:+$$current,}pg_stat_statements"; \
	echo "+ ALTER SYSTEM SET shared_preload_libraries = '$$wanted'"; \
	psql "$(PG_ADMIN_URL)" -XAtqc "ALTER SYSTEM SET shared_preload_libraries = '$$wanted'"; \
	version="$$(ls /etc/postgresql 2>/dev/null | sort -n | tail -n1)"; \
	if [[ -z "$$version" ]]; then \
		echo "no local cluster in /etc/postgresql: restart your Postgres yourself for it to load pg_stat_statements"; exit 1; fi; \
	echo "+ pg_ctlcluster $$version main restart"; \
	pg_ctlcluster --skip-systemctl-redirect "$$version" main restart; \
	for _ in $$(seq 60); do pg_isready -q -d "$(PG_ADMIN_URL)" && break; sleep 1; done; \
	psql "$(PG_ADMIN_URL)" -XAtc 'SHOW shared_preload_libraries'

# Failure testing. It stops and starts this machine's RabbitMQ (rabbitmqctl stop_app/start_app)
# and Postgres (pg_ctlcluster stop/start), and starts them again however it ends; like the
# benchmark it runs the release binaries next to it.
chaos: ## failures under load, each verified: RabbitMQ down, Postgres restart, kill -9 server/consumer, hostile clients, poison deliveries, consumer's database cut (~3 min)
	$(CARGO) build --release --workspace --bins
	"$${CARGO_TARGET_DIR:-target}/release/txoutbox-chaos" $(CHAOS_ARGS)

chaos-quick: ## the short form of every chaos case (~2 min), as CI runs it
	$(MAKE) --no-print-directory chaos CHAOS_ARGS="--quick $(CHAOS_ARGS)"

# nextest runs each test in its own process but no doctests, so those follow; plain
# `cargo test` runs them itself. Feature `diesel` is off in the workspace run (the tests of
# examples/diesel.rs build it with the feature); its own tests and doctests run after, on the
# library alone, reusing that build. Everything runs even after a failure; the status says if any.
test: ## every test against the real Postgres and RabbitMQ (DATABASE_URL, AMQP_URL)
	@status=0; \
	echo "+ $(CARGO) build --workspace --bins"; \
	$(CARGO) build --workspace --bins || exit $$?; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo "+ $(CARGO) nextest run --workspace --no-fail-fast"; \
		$(CARGO) nextest run --workspace --no-fail-fast || status=$$?; \
		echo "+ $(CARGO) nextest run -p txoutbox --features diesel --no-fail-fast -E 'test(/^diesel::/)'"; \
		$(CARGO) nextest run -p txoutbox --features diesel --no-fail-fast -E 'test(/^diesel::/)' || status=$$?; \
		echo "+ $(CARGO) test --workspace --doc"; \
		$(CARGO) test --workspace --doc || status=$$?; \
		echo "+ $(CARGO) test -p txoutbox --doc --features diesel -- diesel"; \
		$(CARGO) test -p txoutbox --doc --features diesel -- diesel || status=$$?; \
	else \
		echo "+ $(CARGO) test --workspace --no-fail-fast   (cargo-nextest is not installed)"; \
		$(CARGO) test --workspace --no-fail-fast || status=$$?; \
		echo "+ $(CARGO) test -p txoutbox --features diesel --test it --no-fail-fast -- diesel::"; \
		$(CARGO) test -p txoutbox --features diesel --test it --no-fail-fast -- diesel:: || status=$$?; \
	fi; \
	$(MAKE) --no-print-directory library-check || status=$$?; \
	exit $$status

library-check: ## the library's rustdoc builds with warnings denied, and it packages
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc -p txoutbox --no-deps --quiet
	$(CARGO) package -p txoutbox --allow-dirty --quiet

fmt: ## format the code
	$(CARGO) fmt

lint: ## cargo fmt --check, and cargo clippy --all-targets -- -D warnings, without and with feature diesel
	@status=0; \
	echo "+ $(CARGO) fmt --check"; \
	$(CARGO) fmt --check || status=$$?; \
	echo "+ $(CARGO) clippy --workspace --all-targets -- -D warnings"; \
	$(CARGO) clippy --workspace --all-targets -- -D warnings || status=$$?; \
	echo "+ $(CARGO) clippy --workspace --all-targets --features txoutbox/diesel -- -D warnings"; \
	$(CARGO) clippy --workspace --all-targets --features txoutbox/diesel -- -D warnings || status=$$?; \
	exit $$status
