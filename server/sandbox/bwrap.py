"""The command that starts an agent CLI inside its session's bubblewrap sandbox.

The SDK starts `cli_path` with the server's whole environment merged under the
session's, so `cli_path` is a small shell script (written once per server, outside every
sandbox) that reads the session's sandbox from AGENTPLANE_SANDBOX_* variables and execs
bwrap. Inside, the agent sees:

- `/usr` (and the /bin, /lib symlinks into it), a few files of /etc and the CLI binary
  (at /run/agentplane/claude), all read-only; a fresh /proc, a minimal /dev;
- its session folder, read-write, at the same path, and the folder's `t/` as /tmp;
- the host paths its tenant's stdio MCP servers need (their `paths`), read-only;
- nothing else: not the database, the tenants file, other sessions or the server's files;
- its own PID, network, IPC, UTS and cgroup namespaces; its network has only loopback,
  where a forwarder (socat) listens on the gateway's port and relays to the metering
  gateway's unix socket, bound in at /run/agentplane/gateway.sock;
- never host root: every process runs as the session's own unprivileged host uid (one
  per live session, `uids.py`, or the tenant's os_user), with no capabilities, no new
  privileges and a seccomp filter (`seccomp.py`); /etc/passwd and /etc/group list only
  that user, root and nobody;
- only the variables named in AGENTPLANE_SANDBOX_ENV (the CLI's own), never the server's;
- no file descriptor of the server's: the SDK gives the CLI its own stdin, stdout and
  stderr pipes, and the launcher's descriptors are closed by bwrap once read.

Every process of the session joins its cgroups before bwrap starts, and bwrap dies with
the server (--die-with-parent), taking the whole PID namespace with it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

GATEWAY_INSIDE = "/run/agentplane/gateway.sock"
# Where the CLI binary is seen inside (wherever it lies outside, /tmp even).
CLI_INSIDE = "/run/agentplane/claude"
# Files of /etc the CLI and ordinary tools need (DNS-free host names, time zone, dynamic
# linker cache, certificates); none of them is secret. passwd and group are the launcher's.
ETC_FILES = (
    "nsswitch.conf",
    "hosts",
    "localtime",
    "ld.so.cache",
    "alternatives",
    "ssl",
    "ca-certificates",
    "bash.bashrc",
    "profile",
    "inputrc",
    "mime.types",
)
NAMESPACES = (
    "--unshare-pid",
    "--unshare-net",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup-try",
)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RO_PATH = re.compile(r"/[A-Za-z0-9._/@+-]*")
_USER = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}")


@dataclass(frozen=True)
class Tools:
    """The programs the sandbox is built with (absolute paths)."""

    bwrap: Path
    socat: Path
    setpriv: Path


def sandbox_args() -> list[str]:
    """bwrap's arguments that build the system part of every sandbox (and the probe's)."""
    args = [
        "--die-with-parent",
        "--new-session",
        *NAMESPACES,
        "--cap-drop",
        "ALL",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/local/bin:/usr/bin:/bin",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for link in ("bin", "sbin", "lib", "lib64"):
        if Path("/", link).is_symlink() or not Path("/", link).exists():
            args += ["--symlink", f"usr/{link}", f"/{link}"]
        else:
            args += ["--ro-bind", f"/{link}", f"/{link}"]
    # Folders bwrap makes for a mount point are 0700: the session's uid could not enter them.
    args += ["--perms", "0755", "--dir", "/etc"]
    for name in ETC_FILES:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    return [
        *args,
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/run",
        "--perms",
        "0755",
        "--dir",
        str(Path(GATEWAY_INSIDE).parent),
    ]


# The launcher: `@NAME@` marks are filled in by `launcher_script` (shell-quoted).
_LAUNCHER = r"""#!/bin/sh
# Written by agentplane (server/sandbox/bwrap.py): starts one session's agent CLI in its
# sandbox. Not for hand use: it reads the sandbox from AGENTPLANE_SANDBOX_* variables.
set -eu
S=${AGENTPLANE_SESSION_DIR:?this is an agentplane session launcher; it needs AGENTPLANE_SESSION_DIR}
# Never host root: every process of the session runs as the session's own uid.
U=${AGENTPLANE_SANDBOX_UID:?the session has no uid of its own (AGENTPLANE_SANDBOX_UID)}
G=${AGENTPLANE_SANDBOX_GID:?the session has no gid of its own (AGENTPLANE_SANDBOX_GID)}
[ "$U" != 0 ] && [ "$G" != 0 ] || { echo "agentplane: refusing to run an agent as root" >&2; exit 1; }
for procs in ${AGENTPLANE_SANDBOX_CGROUPS:-}; do echo $$ > "$procs"; done
config=$S/h/.claude
# "$@" becomes: n words of bwrap options, then the command.
set -- @SETPRIV@ --reuid="$U" --regid="$G" --clear-groups --inh-caps=-all --no-new-privs -- \
  /bin/sh -c @FORWARDER@ "$AGENTPLANE_SANDBOX_PORT" "$PWD" @CLI_INSIDE@ "$@"
n=0
if [ "${CLAUDE_CONFIG_DIR:-$config}" != "$config" ]; then
  # A resume: the SDK put the transcript in a folder of the server's. The agent gets a copy
  # in its own folder, seen at the path the SDK expects its transcript under. The copy goes
  # to a new folder (mktemp), never into one an earlier agent of this session could have
  # filled with symlinks (no process of the session runs now: the server made sure).
  fresh=$(mktemp -d "$S/h/.claude-resumed.XXXXXX")
  cp -R "$CLAUDE_CONFIG_DIR/." "$fresh/"
  chown -R "$U:$G" "$fresh"
  set -- --bind "$fresh" "$CLAUDE_CONFIG_DIR" "$@"; n=$((n + 3))
  d=$CLAUDE_CONFIG_DIR
  while d=${d%/*}; [ -n "$d" ]; do set -- --perms 0711 --dir "$d" "$@"; n=$((n + 4)); done
fi
# Host paths an MCP server of the tenant needs (validated: no spaces, no glob characters).
# The folders bwrap makes above a mount point would be root's and 0700: the agent's uid
# must pass them (0711: pass, not list).
for p in ${AGENTPLANE_SANDBOX_RO_BINDS:-}; do
  set -- --ro-bind "$p" "$p" "$@"; n=$((n + 3))
  d=$p
  while d=${d%/*}; [ -n "$d" ]; do set -- --perms 0711 --dir "$d" "$@"; n=$((n + 4)); done
done
for name in $AGENTPLANE_SANDBOX_ENV; do
  eval "[ -z \"\${$name+x}\" ]" || { eval "set -- --setenv $name \"\$$name\" \"\$@\""; n=$((n + 3)); }
done
# The session folder, after /tmp (its t/) is mounted, so a work dir under /tmp works too;
# the folders above it are made traversable (0711), not listable.
set -- --bind "$S" "$S" "$@"; n=$((n + 3))
d=$S
while d=${d%/*}; [ -n "$d" ]; do set -- --perms 0711 --dir "$d" "$@"; n=$((n + 4)); done
# The options (with the session's variables) reach bwrap through a file descriptor, and
# bwrap starts with an empty environment: neither its command line nor its environment,
# both visible in /proc, holds a secret of the server's.
umask 077
options=${0%/*}/options.$$
: > "$options"
while [ "$n" -gt 0 ]; do printf '%s\0' "$1" >> "$options"; shift; n=$((n - 1)); done
exec 3< "$options"
rm -f "$options"
# The seccomp filter (seccomp.py), and the only users and groups the agent sees: itself,
# root and nobody (not the host's list).
exec 4< @SECCOMP@
exec 5<<PASSWD
root:x:0:0:root:/root:/usr/sbin/nologin
${AGENTPLANE_SANDBOX_USER:-agent}:x:$U:$G::$S/h:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
PASSWD
exec 6<<GROUP
root:x:0:
${AGENTPLANE_SANDBOX_USER:-agent}:x:$G:
nogroup:x:65534:
GROUP
exec /usr/bin/env -i @BWRAP@ @SYSTEM@ --cap-add CAP_SETUID --cap-add CAP_SETGID \
  --seccomp 4 --perms 0644 --ro-bind-data 5 /etc/passwd --perms 0644 --ro-bind-data 6 /etc/group \
  --ro-bind @CLI@ @CLI_INSIDE@ --bind "$AGENTPLANE_SANDBOX_GATEWAY" @GATEWAY@ \
  --bind "$S/t" /tmp --chdir / --args 3 -- "$@"
"""


def launcher_script(tools: Tools, cli: Path, seccomp_filter: Path) -> str:
    """The shell script the SDK runs as the CLI (see the module docstring)."""
    q = shlex.quote
    forwarder = (
        f"{q(str(tools.socat))} TCP-LISTEN:$0,bind=127.0.0.1,fork,reuseaddr,nodelay "
        f'UNIX-CONNECT:{GATEWAY_INSIDE} & cd "$1" && shift && exec "$@"'
    )
    fills = {
        "@FORWARDER@": q(forwarder),
        "@CLI@": q(str(cli)),
        "@CLI_INSIDE@": q(CLI_INSIDE),
        "@SETPRIV@": q(str(tools.setpriv)),
        "@BWRAP@": q(str(tools.bwrap)),
        "@SYSTEM@": " ".join(q(a) for a in sandbox_args()),
        "@GATEWAY@": q(GATEWAY_INSIDE),
        "@SECCOMP@": q(str(seccomp_filter)),
    }
    script = _LAUNCHER
    for mark, value in fills.items():
        script = script.replace(mark, value)
    return script


def write_launcher(path: Path, tools: Tools, cli: Path, seccomp_filter: Path) -> Path:
    """Write the launcher script to `path` (atomically, root-readable only) and return it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(launcher_script(tools, cli, seccomp_filter))
    tmp.chmod(0o700)
    tmp.replace(path)
    return path


def session_variables(
    *,
    passed: Iterable[str],
    cgroup_procs: Iterable[Path],
    gateway_socket: Path,
    port: int,
    uid: int,
    gid: int,
    user: str = "agent",
    ro_paths: Iterable[str] = (),
) -> dict[str, str]:
    """The AGENTPLANE_SANDBOX_* variables of one CLI start. `passed` names the variables
    the CLI gets inside (the SDK's own are added here); `uid`:`gid` the host ids every
    process of the session runs as (never 0), called `user` inside; `ro_paths`, host
    paths bound read-only at the same place (a tenant's MCP servers' programs)."""
    if uid == 0 or gid == 0:
        raise ValueError("a sandboxed agent never runs as root")
    if not _USER.fullmatch(user):
        raise ValueError(f"not a user name: {user!r}")
    names = sorted({*passed, *SDK_VARIABLES} - {"PATH"})
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise ValueError(f"not an environment variable name: {bad[0]!r}")
    env = {
        "AGENTPLANE_SANDBOX_ENV": " ".join(names),
        "AGENTPLANE_SANDBOX_CGROUPS": " ".join(str(p) for p in cgroup_procs),
        "AGENTPLANE_SANDBOX_GATEWAY": str(gateway_socket),
        "AGENTPLANE_SANDBOX_PORT": str(port),
    }
    paths = list(dict.fromkeys(ro_paths))
    bad = [p for p in paths if not _RO_PATH.fullmatch(p)]
    if bad:
        raise ValueError(f"not a path the sandbox can bind: {bad[0]!r}")
    if paths:
        env["AGENTPLANE_SANDBOX_RO_BINDS"] = " ".join(paths)
    env["AGENTPLANE_SANDBOX_UID"] = str(uid)
    env["AGENTPLANE_SANDBOX_GID"] = str(gid)
    env["AGENTPLANE_SANDBOX_USER"] = user
    return env


# Variables the SDK itself sets for the CLI (claude_agent_sdk/_internal/transport/
# subprocess_cli.py), which must reach it inside.
SDK_VARIABLES = (
    "CLAUDE_CODE_ENTRYPOINT",
    "CLAUDE_AGENT_SDK_VERSION",
    "CLAUDE_AGENT_SDK_CLIENT_APP",
    "CLAUDE_AGENT_SDK_DERIVED_CLIENT_APP",
    "CLAUDE_CODE_SDK_READS_SESSION_STATE",
    "CLAUDE_CODE_ENABLE_SDK_FILE_CHECKPOINTING",
    "TRACEPARENT",
    "TRACESTATE",
    "PWD",
    "CLAUDE_CONFIG_DIR",
)
