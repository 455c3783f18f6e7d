#!/bin/sh
# One-shot, idempotent: the roles and databases of the MLflow tracking server (runs and the
# registry; users and permissions of basic-auth), the Prefect server (with pg_trgm, which its
# migrations need) and medloop's feedback store. Passwords come from the environment.
set -eu
psql_admin() { psql --no-psqlrc -v ON_ERROR_STOP=1 "$@"; }
role() {  # role NAME PASSWORD
  psql_admin -d postgres -v name="$1" -v password="$2" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'name') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'name')
\gexec
SELECT format('ALTER ROLE %I PASSWORD %L', :'name', :'password')
\gexec
SQL
}
database() {  # database NAME OWNER
  psql_admin -d postgres -v name="$1" -v owner="$2" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'name', :'owner') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name')
\gexec
SQL
}
role mlflow "$MLFLOW_DB_PASSWORD"
role prefect "$PREFECT_DB_PASSWORD"
role feedback "$FEEDBACK_DB_PASSWORD"
database mlflow mlflow
database mlflow_auth mlflow
database prefect prefect
database feedback feedback
psql_admin -d prefect -c 'CREATE EXTENSION IF NOT EXISTS pg_trgm'
echo "databases ready"
