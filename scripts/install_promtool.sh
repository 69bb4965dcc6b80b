#!/bin/sh
# Installs promtool, which checks and tests deploy/prometheus's alert rules, from Debian's
# `prometheus` package where this machine lets us (as root with apt-get): only the tool,
# unpacked from the package (not the Prometheus server, its service and web assets).
# Otherwise says what to install; the tests that need it skip until then.
set -eu
command -v promtool >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing promtool (from Debian's prometheus package)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  cd "$tmp"
  apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download -q prometheus >/dev/null; }
  dpkg-deb -x prometheus_*.deb root
  install -m 0755 root/usr/bin/promtool /usr/local/bin/promtool
  promtool --version | head -n1
  exit 0
fi
echo "warning: promtool not found (Debian/Ubuntu: apt-get install prometheus; or a release" \
  "from prometheus.io); the alert rules' tests skip until then" >&2
