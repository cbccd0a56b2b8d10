#!/bin/bash
# Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d).
# Temporal keeps its own databases (auto-setup creates "temporal" and "temporal_visibility");
# procflow's business records get a database and a role of their own.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v password="${RECORDS_DB_PASSWORD:?RECORDS_DB_PASSWORD is not set}" <<'SQL'
CREATE ROLE procflow LOGIN PASSWORD :'password';
CREATE DATABASE procflow OWNER procflow;
SQL
