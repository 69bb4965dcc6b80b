#!/bin/sh
# Installs what the session sandbox needs (bubblewrap, socat; setpriv is util-linux;
# libseccomp for its seccomp filter), where this machine lets us: as root with apt-get.
# Otherwise says what to install.
set -eu
missing=
for tool in bwrap socat setpriv; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || missing="$missing libseccomp"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing the session sandbox's tools:$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap socat util-linux libseccomp2 >/dev/null
  exit 0
fi
echo "warning: the session sandbox needs$missing (Debian/Ubuntu, as root: apt-get install -y" \
  "bubblewrap socat libseccomp2); until then the server refuses to start unless AGENTPLANE_SANDBOX=none" >&2
