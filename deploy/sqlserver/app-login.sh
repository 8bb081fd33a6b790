#!/bin/sh
# sqlserver-login (a one-shot, after the migration): creates or updates the application's
# login from app-login.sql, as `sa`.
set -eu

# The password goes into a T-SQL string literal: a quote is doubled.
password=$(printf '%s' "$APP_PASSWORD" | sed "s/'/''/g")

"${SQLCMD:-/opt/mssql-tools18/bin/sqlcmd}" -C -b -S "$SQLSERVER" -U sa -P "$MSSQL_SA_PASSWORD" \
  -i /opt/eventpipe/app-login.sql \
  -v APP_LOGIN="$APP_LOGIN" APP_PASSWORD="$password" DATABASE="$DATABASE"
echo "sqlserver-login: login $APP_LOGIN may read and write database $DATABASE"
