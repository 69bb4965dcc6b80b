#!/bin/sh
# Installs PgBouncer, which the tests run in front of PostgreSQL in transaction mode
# (tests/pgbouncer.py), where this machine lets us: as root with apt-get. Otherwise says
# what to install; until then those tests are skipped.
set -eu
command -v pgbouncer >/dev/null 2>&1 && exit 0
[ -x /usr/sbin/pgbouncer ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing pgbouncer (for the tests through a pooler)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
  exit 0
fi
echo "warning: the tests through PgBouncer need it (Debian/Ubuntu, as root: apt-get install -y" \
  "pgbouncer); until then they are skipped" >&2
