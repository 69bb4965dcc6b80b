#!/usr/bin/env python3
"""Smoke-test the built artifact: what `pip install agentplane[server]` gives an operator.

Builds the sdist and, from it, the wheel (`python -m build`) from a clean copy of the
checkout's files (git's list: tracked and new, never ignored), installs the wheel with its
`server` extra into a fresh virtualenv outside the checkout and, from a directory outside
the checkout, checks that:
  1. every file of client/, server/ and migrations/ is in the installed package (modules,
     the price table, the migrations' script.py.mako, py.typed, the stubs' .pyi);
  2. every module of the installed package imports (a dependency the wheel does not
     declare is missing from the fresh virtualenv, so its import fails, naming it);
  3. `agentplane-server --version` and `agentplane --version` print the package's version;
  4. `agentplane-server dev` on a temporary SQLite database reaches SERVING, sandboxed;
  5. one session through the installed `agentplane run` ends COMPLETE (the sandbox model
     answers it, as `agentplane-server dev` starts it without ANTHROPIC_API_KEY);
  6. SIGTERM stops the server with exit code 0.
Any failure prints `smoke: FAILED: ...` naming what was missing and exits 1; the temporary
folder is then kept for inspection (SMOKE_KEEP=1 keeps it after a success too).

Run with a Python that has `build` installed (the dev virtualenv): `make smoke`.
Standard library only, so it runs before anything of agentplane is importable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Source folder -> its place in the installed package (pyproject.toml's package-dir).
SOURCE_ROOTS = {
    "client": Path("agentplane"),
    "server": Path("agentplane/server"),
    "migrations": Path("agentplane/server/migrations"),
}
# Run by Alembic with its migration context, never imported on its own.
NOT_IMPORTABLE = {"agentplane.server.migrations.env"}
SERVING_TIMEOUT_S = 180.0  # a loaded 2-core machine: migrations, the CLI's first start
SESSION_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 90.0  # the 25 s drain grace and then some


class SmokeFailure(Exception):
    """A check failed; the message says which and what was missing."""


def step(text: str) -> None:
    print(f"smoke: {text}", flush=True)


def run(
    argv: Sequence[str | Path],
    *,
    what: str,
    cwd: Path,
    env: dict[str, str],
    log: Path | None = None,
    timeout: float = 600.0,
) -> subprocess.CompletedProcess[str]:
    """Run a command; SmokeFailure naming `what` (and the output's tail) if it fails."""
    try:
        done = subprocess.run(
            [str(a) for a in argv],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SmokeFailure(f"{what}: no answer within {timeout:.0f} s") from None
    except FileNotFoundError as exc:
        raise SmokeFailure(f"{what}: {exc.filename} is not there") from None
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()
        tail = "\n".join(output[-25:])
        raise SmokeFailure(f"{what}: exit code {done.returncode}\n{tail}")
    return done


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def checkout_files() -> list[str]:
    """The checkout's files as git sees them: tracked, and new ones not ignored (no
    .venv, caches, build/ or the editable install's egg-info, whose stale SOURCES.txt
    setuptools would read into the sdist)."""
    try:
        listed = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        raise SmokeFailure(f"cannot list the source files: {REPO} is not a git checkout") from None
    return sorted({name for name in listed if name and (REPO / name).is_file()})


def package_files(files: list[str]) -> list[str]:
    """Those of the package roots (client/, server/, migrations/)."""
    return [name for name in files if name.split("/", 1)[0] in SOURCE_ROOTS]


def copy_source(files: list[str], tmp: Path) -> Path:
    """The checkout's files (with their uncommitted changes) in a clean folder to build from."""
    src = tmp / "src"
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    return src


def clean_env(venv: Path) -> dict[str, str]:
    """The environment an operator's shell would have: the venv first on PATH, nothing of
    this checkout, no agentplane or Anthropic settings (dev mode then starts the sandbox
    model)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AGENTPLANE_", "ANTHROPIC_", "PYTHON", "VIRTUAL_ENV", "OTEL_"))
    }
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
    env["PYTHONNOUSERSITE"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(tmp: Path, src: Path, env: dict[str, str]) -> Path:
    """The sdist, then the wheel built from it (what `python -m build` does by default, so a
    file the sdist leaves out is missing from the wheel too). Returns the wheel."""
    dist = tmp / "dist"
    step("building the sdist and the wheel (python -m build)")
    run(
        [sys.executable, "-m", "build", "--outdir", dist, src],
        what="python -m build",
        cwd=tmp,
        env=env,
        log=tmp / "build.log",
    )
    wheels = sorted(dist.glob("agentplane-*.whl"))
    if len(wheels) != 1 or not list(dist.glob("agentplane-*.tar.gz")):
        raise SmokeFailure(f"python -m build: expected one sdist and one wheel in {dist}")
    return wheels[0]


def install(tmp: Path, wheel: Path, env: dict[str, str]) -> Path:
    """A fresh virtualenv outside the checkout with the wheel and its server extra."""
    venv = tmp / "venv"
    step(f"installing {wheel.name}[server] into a fresh virtualenv {venv}")
    run([sys.executable, "-m", "venv", venv], what="python -m venv", cwd=tmp, env=env)
    run(
        [venv / "bin/python", "-m", "pip", "install", "--progress-bar", "off", f"{wheel}[server]"],
        what=f"pip install {wheel.name}[server]",
        cwd=tmp,
        env=env,
        log=tmp / "pip.log",
    )
    return venv


def site_packages(venv: Path, env: dict[str, str], tmp: Path) -> Path:
    done = run(
        [venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        what="the virtualenv's python",
        cwd=tmp,
        env=env,
    )
    return Path(done.stdout.strip())


def check_files(installed: Path, files: list[str]) -> None:
    """Every file of the package roots is in the installed package."""
    missing = []
    for name in files:
        root, _, rest = name.partition("/")
        if not (installed / SOURCE_ROOTS[root] / rest).is_file():
            missing.append(f"{name} (expected at {SOURCE_ROOTS[root] / rest})")
    if missing:
        raise SmokeFailure(
            "the installed package lacks these files of the source tree (a package not "
            "found by pyproject.toml's discovery, or package data not declared):\n  "
            + "\n  ".join(missing)
        )
    step(f"all {len(files)} files of client/, server/ and migrations/ are installed")


IMPORT_ALL = """
import importlib, json, pkgutil, sys, traceback
import agentplane
skip, venv = set(json.loads(sys.argv[1])), sys.argv[2]
failed, count = [], 0
if not agentplane.__file__.startswith(venv):
    failed.append(f"agentplane: imported from {agentplane.__file__}, not the virtualenv")
def walk_error(name):
    failed.append(f"{name}: {traceback.format_exc().strip().splitlines()[-1]}")
for module in pkgutil.walk_packages(agentplane.__path__, "agentplane.", onerror=walk_error):
    if module.name in skip:
        continue
    count += 1
    try:
        importlib.import_module(module.name)
    except BaseException as exc:
        failed.append(f"{module.name}: {type(exc).__name__}: {exc}")
print(json.dumps({"count": count, "failed": failed}))
"""


def check_imports(venv: Path, env: dict[str, str], cwd: Path) -> None:
    """Every module of the installed package imports in the fresh virtualenv."""
    done = run(
        [venv / "bin/python", "-c", IMPORT_ALL, json.dumps(sorted(NOT_IMPORTABLE)), str(venv)],
        what="importing the installed package",
        cwd=cwd,
        env=env,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["failed"]:
        raise SmokeFailure(
            "modules of the installed package that do not import (a dependency not declared "
            "in pyproject.toml for the server install, or a module left out):\n  "
            + "\n  ".join(report["failed"])
        )
    step(f"all {report['count']} modules of the installed package import")


def check_versions(venv: Path, env: dict[str, str], cwd: Path, version: str) -> None:
    for command in ("agentplane-server", "agentplane"):
        done = run(
            [venv / "bin" / command, "--version"], what=f"{command} --version", cwd=cwd, env=env
        )
        printed = done.stdout.strip()
        if printed != f"{command} {version}":
            raise SmokeFailure(f"{command} --version printed {printed!r}, not {command} {version}")
    step(f"agentplane-server --version and agentplane --version print {version}")


class DevServer:
    """`agentplane-server dev` of the installed package, on a temporary SQLite database."""

    def __init__(self, venv: Path, env: dict[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.log = cwd / "server.log"
        work = cwd / "w"  # AGENTPLANE_WORK_DIR: at most 40 bytes (the CLI's socket paths)
        self.env = dict(
            env,
            AGENTPLANE_LISTEN=f"127.0.0.1:{self.port}",
            AGENTPLANE_DATABASE_URL=f"sqlite:///{cwd / 'smoke.db'}",
            AGENTPLANE_WORK_DIR=str(work),
        )
        if len(str(work).encode()) > 40:
            raise SmokeFailure(f"the work dir {work} is longer than 40 bytes")
        self.venv, self.cwd = venv, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        step(f"starting agentplane-server dev on 127.0.0.1:{self.port} (log: {self.log})")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(self.venv / "bin/agentplane-server"), "dev"],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed whole on a failure
            )

    def client(
        self, *args: str, what: str, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        argv = [*self.client_argv(), *args]
        return run(argv, what=what, cwd=self.cwd, env=self.env, timeout=timeout)

    def client_argv(self) -> list[str]:
        """The installed `agentplane` CLI, pointed at this server."""
        return [str(self.venv / "bin/agentplane"), "--target", f"127.0.0.1:{self.port}"]

    def log_tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return "\n".join(lines[-25:])

    def wait_serving(self) -> None:
        """Health SERVING, through the installed client; the server must stay up meanwhile."""
        assert self.proc is not None
        deadline = time.monotonic() + SERVING_TIMEOUT_S
        while True:
            code = self.proc.poll()
            if code is not None:
                raise SmokeFailure(
                    f"agentplane-server dev exited {code} before it was SERVING:\n{self.log_tail()}"
                )
            probe = subprocess.run(
                [*self.client_argv(), "--timeout", "5", "health"],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise SmokeFailure(
                    f"agentplane-server dev was not SERVING within {SERVING_TIMEOUT_S:.0f} s "
                    f"(last answer: {(probe.stdout + probe.stderr).strip()}):\n{self.log_tail()}"
                )
            time.sleep(0.5)
        # Sessions run in bubblewrap sandboxes, not the AGENTPLANE_SANDBOX=none opt-out.
        self.client(
            "health", "--service", "agentplane.sandbox", what="health of agentplane.sandbox"
        )
        step("the server is SERVING, sessions sandboxed (health agentplane.sandbox SERVING)")

    def run_session(self) -> None:
        done = self.client(
            "--timeout",
            str(SESSION_TIMEOUT_S),
            "run",
            "smoke test: say hello",
            "--json",
            what="agentplane run (one session)",
            timeout=SESSION_TIMEOUT_S + 30,
        )
        events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        final = events[-1].get("result", {}).get("session", {}) if events else {}
        if final.get("state") != "SESSION_STATE_COMPLETE":
            raise SmokeFailure(
                f"the session did not end COMPLETE: {final or done.stdout[-2000:]}\n{self.log_tail()}"
            )
        step(f"session {final['id']} ended COMPLETE ({final.get('result', '')!r})")

    def stop(self) -> None:
        """SIGTERM: the server drains and exits 0."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SmokeFailure(
                f"agentplane-server did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM:\n"
                + self.log_tail()
            ) from None
        if code != 0:
            raise SmokeFailure(
                f"agentplane-server exited {code} on SIGTERM, not 0:\n{self.log_tail()}"
            )
        step("SIGTERM: the server stopped with exit code 0")

    def kill(self) -> None:
        """After a failure: the server and whatever it started."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def smoke(tmp: Path) -> None:
    version = project_version()
    env = clean_env(tmp / "venv")
    files = checkout_files()
    wheel = build(tmp, copy_source(files, tmp), env)
    venv = install(tmp, wheel, env)
    check_files(site_packages(venv, env, tmp), package_files(files))
    check_imports(venv, env, tmp)
    check_versions(venv, env, tmp, version)
    server = DevServer(venv, env, tmp)
    try:
        server.start()
        server.wait_serving()
        server.run_session()
        server.stop()
    finally:
        server.kill()


def main() -> int:
    started = time.monotonic()
    os.umask(0o022)  # installed files readable by every uid (a tenant's os_user)
    # Short (AGENTPLANE_WORK_DIR lives in it) and outside the checkout; 0755 (and /tmp
    # above it is world-traversable), as an operator's install must be: a tenant's os_user,
    # an unprivileged uid, runs the CLI binary bundled inside the virtualenv.
    tmp = Path(tempfile.mkdtemp(prefix="apsmoke-", dir="/tmp"))
    tmp.chmod(0o755)
    try:
        smoke(tmp)
    except SmokeFailure as exc:
        print(f"smoke: FAILED: {exc}", file=sys.stderr, flush=True)
        print(f"smoke: kept {tmp} for inspection", file=sys.stderr)
        return 1
    if os.environ.get("SMOKE_KEEP") == "1":
        step(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    step(f"passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
