#!/usr/bin/env bash
# Regenerates schema.sql (the example service's complete schema) from the library's migrations
# and the service's orders table. A service test checks the file equals what this prints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
{
    head -n 3 schema.sql
    echo
    cargo run -q -p txoutbox-cli --bin txoutbox -- migrate --print
    echo
    cat service/schema/orders.sql
} >schema.sql.new
mv schema.sql.new schema.sql
