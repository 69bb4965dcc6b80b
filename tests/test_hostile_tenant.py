"""The session sandbox, tried as a hostile tenant would.

An attacking tenant's agent is scripted (through the sandbox model) to run each attack as
a `Bash` command while another tenant's session runs; the tests assert on what the
attack's tool result showed and on the victim's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pyseccomp
import pytest
from agentplane import server
from agentplane.server.model_double import HttpFailure, Script, Step, ToolCall, Usage
from agentplane.server.sandbox import seccomp
from agentplane.v1 import budget_pb2, session_pb2
from harness import (
    TOKENS,
    Harness,
    processes,
    short_dir,
    start_harness,
    stop_harness,
    tenant_toml,
)

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(os.geteuid() != 0, reason="the session sandbox needs root"),
]

VICTIM_PROMPT = "You are victim's assistant; VICTIM-PROMPT-7731."
TOKENS.update({"victim": "victim-token-7", "worker": "worker-token-8", "pooled": "pooled-token-9"})
LIMITED = {  # tenant -> its one tight limit
    "lim_disk": {"max_disk_mib": 16},
    "lim_mem": {"max_memory_mib": 400},
    "lim_procs": {"max_processes": 64},
    "lim_cpu": {"max_cpu_s": 3},
}
TOKENS.update({name: f"{name}-token" for name in LIMITED})


@pytest.fixture(scope="module")
async def h(database_url: str) -> AsyncIterator[Harness]:
    key = "AGENTPLANE_TEST_ACME_KEY"
    template = short_dir("tpl")
    (template / "plan.txt").write_text("The plan is GUAVA.\n")
    tables = [
        tenant_toml(
            "victim",
            TOKENS["victim"],
            anthropic_api_key_env="AGENTPLANE_TEST_GLOBEX_KEY",
            allowed_tools=["Bash"],
            system_prompt=VICTIM_PROMPT,
            daily_limit_usd=5.0,
        ),
        tenant_toml(
            "worker",
            TOKENS["worker"],
            anthropic_api_key_env=key,
            allowed_tools=["Bash", "Read", "Write", "Glob", "Grep"],
            workspace_template=template,
        ),
        *(
            tenant_toml(
                name, TOKENS[name], anthropic_api_key_env=key, allowed_tools=["Bash"], **limits
            )
            for name, limits in LIMITED.items()
        ),
        tenant_toml(
            "pooled",
            TOKENS["pooled"],
            anthropic_api_key_env=key,
            allowed_tools=["Bash"],
            warm_pool_size=1,
            warm_pool_model="claude-sonnet-4-5",
        ),
    ]
    harness = await start_harness(database_url, extra_tenants="\n".join(tables))
    yield harness
    await stop_harness(harness)


def bash_script(h: Harness, name: str, command: str, *, answer: str = "done") -> str:
    """Script `name`: one Bash call running `command`, then `answer`; the prompt for it."""
    h.sandbox.add_script(
        name,
        Script(
            steps=[
                Step(
                    tool_calls=[ToolCall("Bash", {"command": command, "timeout": 120000})],
                    usage=Usage(input_tokens=1000, output_tokens=50),
                ),
                Step(text=answer, usage=Usage(input_tokens=1200, output_tokens=20)),
            ]
        ),
    )
    return f"[[sandbox:{name}]] go"


def tool_output(events: list[session_pb2.SessionEvent]) -> str:
    return "\n".join(e.tool_result.content for e in events if e.HasField("tool_result"))


def final(events: list[session_pb2.SessionEvent]) -> session_pb2.Session:
    return events[-1].result.session


@contextlib.asynccontextmanager
async def victim_running(h: Harness) -> AsyncIterator[asyncio.Task[list[session_pb2.SessionEvent]]]:
    """A victim session whose agent sits in a `sleep` while the body runs."""
    prompt = bash_script(h, f"victim-{time.monotonic_ns()}", "sleep 6; echo slept")
    started = asyncio.Event()
    events: list[session_pb2.SessionEvent] = []

    async def run() -> list[session_pb2.SessionEvent]:
        call = h.sessions.RunSession(
            session_pb2.RunSessionRequest(prompt=prompt, model="claude-sonnet-4-5"),
            metadata=h.auth("victim"),
        )
        async for event in call:
            events.append(event)
            if event.HasField("tool_use"):
                started.set()
        return events

    task = asyncio.create_task(run())
    await asyncio.wait_for(started.wait(), 60)
    yield task
    await task


async def spent(h: Harness, tenant: str) -> Decimal:
    reply = await h.budgets.GetBudget(budget_pb2.GetBudgetRequest(), metadata=h.auth(tenant))
    return Decimal(reply.spent_usd)


async def test_proc_shows_no_other_session_no_key_and_no_other_prompt(h: Harness) -> None:
    scan = (
        "for p in /proc/[0-9]*; do echo \"== $p\"; tr '\\0' '\\n' < $p/environ; "
        "tr '\\0' ' ' < $p/cmdline; echo; done 2>&1; echo PIDS $(ls -d /proc/[0-9]* | wc -l)"
    )
    prompt = bash_script(h, "scan-proc", scan)
    before = await spent(h, "victim")
    tokens: set[str] = set()

    async def watch_tokens() -> None:  # every session's gateway token while both run
        while True:
            tokens.update(meter.token for meter in h.app.gateway._meters.values())
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch_tokens())
    async with victim_running(h) as victim:
        attack = await h.run("ops", prompt=prompt)
    watcher.cancel()
    out = tool_output(attack)
    assert final(attack).state == session_pb2.SESSION_STATE_COMPLETE
    assert "AGENTPLANE_SESSION_DIR=" in out  # the scan did read its own processes
    assert len(tokens) >= 2
    own_token = [t for t in tokens if t in out]
    assert len(own_token) <= 1, "another session's gateway token was visible"
    assert "sk-ant-test" not in out  # no real key, not even the attacker's own tenant's
    assert "VICTIM-PROMPT-7731" not in out
    assert int(out.rsplit("PIDS ", 1)[1].split()[0]) < 12  # only its own few processes
    # The victim ran undisturbed: its cost is its own script's, and so is its day.
    victim_events = victim.result()
    assert final(victim_events).state == session_pb2.SESSION_STATE_COMPLETE
    assert "slept" in tool_output(victim_events)
    cost = Decimal(final(victim_events).cost_usd)
    assert Decimal(0) < cost < Decimal("0.05")
    assert await spent(h, "victim") == before + cost


async def test_a_warm_agent_is_as_sealed_as_a_cold_one(h: Harness) -> None:
    pool = h.app.sessions.pool
    assert pool is not None
    for _ in range(600):
        if pool.ready("pooled"):
            break
        await asyncio.sleep(0.05)
    hits = pool.stats["pooled"].hits
    scan = (
        "cat /proc/[0-9]*/environ | tr '\\0' '\\n' | grep -c AGENTPLANE_SESSION_DIR=; "
        f"ls {h.app.settings.work_dir}; echo PIDS $(ls -d /proc/[0-9]* | wc -l); "
        "(echo > /dev/tcp/127.0.0.1/5432) 2>/dev/null && echo 'db OPEN' || echo 'db closed'"
    )
    async with victim_running(h):
        events = await h.run("pooled", prompt=bash_script(h, "warm-scan", scan))
    assert pool.stats["pooled"].hits == hits + 1  # served by the warm agent
    out = tool_output(events)
    assert final(events).state == session_pb2.SESSION_STATE_COMPLETE
    assert int(out.rsplit("PIDS ", 1)[1].split()[0]) < 12
    assert "victim" not in out.split("PIDS")[0] and "db closed" in out
    assert "sk-ant-test" not in out


async def test_the_database_tenants_file_and_other_sessions_are_not_visible(h: Harness) -> None:
    work_dir = h.app.settings.work_dir
    db_file = h.database_url.removeprefix("sqlite+aiosqlite:///").removeprefix("sqlite:///")
    # (The folders above the CLI binary exist inside: the way to it, read-only.)
    hidden = [
        work_dir / "victim",
        h.work_dir / "tenants.toml",
        Path(server.__file__).parent,
        Path(__file__).parent,
        "/root",
        "/etc/shadow",
        "/var/tmp",
    ]
    if h.database_url.startswith("sqlite"):
        hidden.append(db_file)
    command = "; ".join(f"ls -la {t}; cat {t}" for t in hidden)
    command += (
        f"; echo LISTING; ls -a {work_dir} {h.work_dir}; echo LISTED"
        "; echo planted > /var/tmp/ap-escape; echo planted > /etc/ap-escape; echo END"
    )
    async with victim_running(h) as victim:
        victim_dirs = list((work_dir / "victim").iterdir())
        attack = await h.run("ops", prompt=bash_script(h, "snoop-files", command))
    out = tool_output(attack)
    assert "END" in out
    assert victim_dirs, "the victim's session folder exists on the host"
    assert "token_sha256" not in out and "SQLite format" not in out
    for target in hidden:
        assert f"ls: cannot access '{target}': No such file or directory" in out, target
    # The folders above its own are the way to it only (0711): the agent, not root, cannot
    # even list them, and no other tenant or database lies there.
    listing = out.split("LISTING", 1)[1].split("LISTED", 1)[0]
    assert "victim" not in listing and "tenants.toml" not in listing
    assert f"ls: cannot open directory '{work_dir}': Permission denied" in listing
    assert not Path("/var/tmp/ap-escape").exists() and not Path("/etc/ap-escape").exists()
    assert final(victim.result()).state == session_pb2.SESSION_STATE_COMPLETE


async def test_no_port_on_loopback_is_reachable_but_the_gateway(h: Harness) -> None:
    connections = 0

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    targets = {
        "grpc": h.app.port,
        "postgresql": 5432,
        "listener": port,
        "model": int(h.sandbox.base_url.rsplit(":", 1)[1]),
    }
    command = (
        "; ".join(
            f"(echo > /dev/tcp/127.0.0.1/{p}) 2>/dev/null && echo '{n} OPEN' || echo '{n} closed'"
            for n, p in targets.items()
        )
        + f"; (echo > /dev/tcp/127.0.0.1/{h.app.gateway.port}) && echo 'gateway OPEN'"
    )
    async with listener:
        attack = await h.run("ops", prompt=bash_script(h, "probe-ports", command))
    out = tool_output(attack)
    for name in targets:
        assert f"{name} closed" in out, out
    assert "gateway OPEN" in out  # the one way out: the metering gateway's forwarder
    assert connections == 0


async def test_the_agent_has_no_capabilities_and_gains_none(h: Harness) -> None:
    command = (
        "grep -E '^(NoNewPrivs|CapInh|CapPrm|CapEff|CapAmb)' /proc/self/status; "
        "mkdir -p /tmp/m; mount -t tmpfs x /tmp/m 2>&1 || echo mount-refused; "
        "su -c 'cat /proc/self/status' root 2>&1 | grep -E '^CapEff' || echo su-gained-nothing"
    )
    events = await h.run("ops", prompt=bash_script(h, "caps", command))
    out = tool_output(events)
    status = dict(line.split(":\t") for line in out.splitlines() if ":\t" in line)
    assert status["NoNewPrivs"] == "1"
    for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, out)
    assert "mount-refused" in out and "su-gained-nothing" in out


async def test_processes_that_shed_their_session_do_not_outlive_it(h: Harness) -> None:
    command = (
        "env -i setsid sleep 987651 >/dev/null 2>&1 & "
        "(env -u AGENTPLANE_SESSION_DIR sleep 987652 >/dev/null 2>&1 &); "
        "setsid -f env -i sleep 987653 >/dev/null 2>&1; "
        "python3 -c \"import os; os.fork() or os.execve('/bin/sleep', ['sleep', '987654'], {})\"; "
        "sleep 0.5; cat /proc/[0-9]*/cmdline | tr '\\0' ' ' | grep -o 'sleep 98765[0-9]' | sort -u"
    )
    events = await h.run("ops", prompt=bash_script(h, "escape", command))
    out = tool_output(events)
    for n in range(1, 5):
        assert f"sleep 98765{n}" in out, out  # each escape attempt ran inside
    assert final(events).state == session_pb2.SESSION_STATE_COMPLETE
    survivors: list[bytes] = []
    for _ in range(600):
        survivors = [
            p.cmdline for p in processes() if b"98765" in p.cmdline and b"grep" not in p.cmdline
        ]
        if not survivors:
            break
        await asyncio.sleep(0.1)
    assert survivors == []


async def test_symlinks_planted_in_its_folder_do_not_reach_the_host_on_a_retry(h: Harness) -> None:
    # The agent points its folder's tmp and config folders at the host's /, /tmp and /etc,
    # then the model fails, so the session is retried: a new CLI starts in the same folder.
    # (Its config folder points at /tmp, which it can write inside, so that its own CLI
    # keeps working; on the host that link names the host's /tmp.)
    plant = (
        "cd $AGENTPLANE_SESSION_DIR && mv t t.old && ln -s / t && mv h h.old && mkdir h "
        "&& ln -s /tmp h/.claude && ln -s /etc h/.claude-resumed.AAAAAA && echo planted"
    )
    check = (
        "echo TMP; ls /tmp; echo SESSION; ls -a $AGENTPLANE_SESSION_DIR $AGENTPLANE_SESSION_DIR/h; "
        "echo probe > /tmp/ap-escape-probe; echo probe > $CLAUDE_CONFIG_DIR/ap-escape-probe; "
        "echo checked"
    )
    h.sandbox.add_script(
        "plant",
        Script(
            steps=[
                Step(tool_calls=[ToolCall("Bash", {"command": plant})]),
                Step(
                    tool_calls=[ToolCall("Bash", {"command": check})],
                    failures=[HttpFailure(500, should_retry=False)],
                ),
                Step(text="done"),
            ]
        ),
    )
    events = await h.run("ops", prompt="[[sandbox:plant]] go")
    out = tool_output(events)
    # (The plant's own output may be lost: it moves the CLI's /tmp away under it.)
    assert "checked" in out, out
    assert any(e.HasField("retrying") for e in events)  # a second CLI started
    tmp, session = out.rsplit("TMP", 1)[1].split("SESSION", 1)
    # The plant ran (its h/.claude-resumed.AAAAAA may be gone by then: the CLI tidies).
    assert "t.old" in session and "h.old" in session and ".claude-resumed." in session
    assert not {"usr", "etc", "root", "proc"} & set(tmp.split())  # /tmp is not the host's /
    assert final(events).state == session_pb2.SESSION_STATE_COMPLETE, final(events).error
    for host_path in ("/ap-escape-probe", "/etc/ap-escape-probe", "/tmp/ap-escape-probe"):
        assert not Path(host_path).exists(), host_path


@pytest.mark.parametrize(
    ("tenant", "command", "reason"),
    [
        (
            "lim_disk",
            "dd if=/dev/zero of=big bs=1M count=64; echo dd=$?; sleep 30",
            session_pb2.ERROR_REASON_DISK_LIMIT,
        ),
        (
            "lim_mem",
            "python3 -c \"a = []\nwhile True: a.append(b'x' * (32 << 20))\"; sleep 30",
            session_pb2.ERROR_REASON_MEMORY_LIMIT,
        ),
        (
            "lim_procs",
            "bomb() { bomb | bomb & }; bomb; sleep 30",
            session_pb2.ERROR_REASON_PROCESS_LIMIT,
        ),
        ("lim_cpu", "timeout 60 sh -c 'while :; do :; done'", session_pb2.ERROR_REASON_CPU_LIMIT),
    ],
)
async def test_a_session_past_a_limit_ends_with_that_limit_and_others_run_on(
    h: Harness,
    tenant: str,
    command: str,
    reason: int,
) -> None:
    attack, bystander = await asyncio.gather(
        h.run(tenant, prompt=bash_script(h, f"hog-{tenant}", command)),
        h.run("ops", prompt=bash_script(h, f"bystander-{tenant}", "sleep 1; echo fine")),
    )
    session = final(attack)
    assert session.state == session_pb2.SESSION_STATE_ERROR, tool_output(attack)
    assert session.error.reason == reason, (session.error.message, tool_output(attack))
    assert "limit" in session.error.message
    assert final(bystander).state == session_pb2.SESSION_STATE_COMPLETE
    assert "fine" in tool_output(bystander)


async def test_the_agent_works_in_its_own_folder_with_its_template(h: Harness) -> None:
    h.sandbox.add_script(
        "work",
        Script(
            steps=[
                Step(
                    tool_calls=[
                        ToolCall("Write", {"file_path": "/tmp/notes.txt", "content": "kiwi\n"})
                    ]
                ),
                Step(tool_calls=[ToolCall("Read", {"file_path": "/tmp/notes.txt"})]),
                Step(tool_calls=[ToolCall("Glob", {"pattern": "*.txt"})]),
                Step(tool_calls=[ToolCall("Grep", {"pattern": "GUAVA", "output_mode": "content"})]),
                Step(
                    tool_calls=[
                        ToolCall(
                            "Bash",
                            {"command": "echo made > mine.txt; cat mine.txt plan.txt; id -u"},
                        )
                    ]
                ),
                Step(text="worked"),
            ]
        ),
    )
    events = await h.run("worker", prompt="[[sandbox:work]] go")
    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert final(events).state == session_pb2.SESSION_STATE_COMPLETE
    assert [r.is_error for r in results] == [False] * 5, [r.content for r in results]
    assert "kiwi" in results[1].content
    assert "plan.txt" in results[2].content
    assert "GUAVA" in results[3].content
    *said, uid = results[4].content.split()
    assert said == ["made", "The", "plan", "is", "GUAVA."]
    low, high = h.app.settings.sandbox_uids
    assert low <= int(uid) <= high  # its own unprivileged uid, not root


# -- the sandbox as a security boundary: never host root, the kernel out of reach -----------

KERNEL_FILES = (
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/kernel/panic",
    "/proc/sys/vm/drop_caches",
    "/proc/sys/vm/overcommit_memory",
    "/proc/sysrq-trigger",
    "/sys/kernel/uevent_helper",
    "/sys/fs/cgroup/cgroup.procs",
)


def host_uids(under: Path) -> set[int]:
    """The real, effective, saved and fs uids of the agent processes whose folders lie
    under `under`, read from the host's /proc."""
    uids: set[int] = set()
    for process in processes(under):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{process.pid}/status").read_text()
            uids.update(int(u) for u in status.split("\nUid:", 1)[1].split("\n", 1)[0].split())
    return uids


async def test_no_agent_process_is_host_root_and_no_two_sessions_share_a_uid(h: Harness) -> None:
    work_dir = h.app.settings.work_dir
    command = "echo ID $(id -u) $(id -g); echo MAP $(cat /proc/self/uid_map)"
    async with victim_running(h) as victim:
        victim_uids = host_uids(work_dir / "victim")
        attack = await h.run("ops", prompt=bash_script(h, "whoami", command))
    out = tool_output(attack)
    uid, gid = (int(v) for v in out.split("ID ", 1)[1].split()[:2])
    # No user namespace: the map is the host's own, so the uid inside is the host uid.
    inside, outside, count = (int(v) for v in out.split("MAP ", 1)[1].split()[:3])
    host_uid = outside + uid - inside
    assert inside <= uid < inside + count
    low, high = h.app.settings.sandbox_uids
    assert low <= host_uid <= high and low <= gid <= high, out
    # Seen from the host, while it ran: the victim's agent processes are one other uid.
    assert len(victim_uids) == 1 and 0 not in victim_uids, victim_uids
    assert host_uid not in victim_uids
    assert final(victim.result()).state == session_pb2.SESSION_STATE_COMPLETE


async def test_kernel_settings_cannot_be_opened_for_writing(h: Harness) -> None:
    # Opened for appending, never written: a test must not change the host.
    probe = (
        "import sys\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        open(path, 'a').close()\n"
        "        print('OPENED', path)\n"
        "    except OSError as exc:\n"
        "        print('REFUSED', path, exc.strerror)\n"
    )
    command = (
        f"python3 -c {shlex.quote(probe)} {' '.join(KERNEL_FILES)}; "
        "unshare -U true 2>&1; echo unshare=$?; "
        "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status"
    )
    events = await h.run("ops", prompt=bash_script(h, "sysctl", command))
    out = tool_output(events)
    for path in KERNEL_FILES:
        assert f"REFUSED {path}" in out, out
    assert "OPENED" not in out
    assert "unshare=1" in out or "unshare=0" not in out
    status = dict(line.split(":\t") for line in out.splitlines() if ":\t" in line)
    assert status == {"Seccomp": "2", "NoNewPrivs": "1"}, out


def syscall_table() -> dict[str, tuple[int, tuple[int, ...], str]]:
    """name -> (number, arguments, the errno the sandbox must answer)."""
    arch = pyseccomp.system_arch()
    table = {name: (pyseccomp.resolve_syscall(arch, name), (), "EPERM") for name in seccomp.BLOCKED}
    table |= {
        name: (pyseccomp.resolve_syscall(arch, name), (), "ENOSYS") for name in seccomp.UNSUPPORTED
    }
    number = pyseccomp.resolve_syscall
    # A new user namespace by clone (SIGCHLD | CLONE_NEWUSER), typing into a terminal.
    table["clone(CLONE_NEWUSER)"] = (number(arch, "clone"), (0x10000000 | 17,), "EPERM")
    table["ioctl(TIOCSTI)"] = (number(arch, "ioctl"), (0, 0x5412, 0), "EPERM")
    return table


async def test_each_blocked_syscall_answers_its_errno(h: Harness) -> None:
    # After Flatpak's tests/try-syscall.c: each call made directly, its errno printed. With
    # nonsense arguments, a call the filter let through would fail otherwise (EFAULT,
    # EBADF, EINVAL...), never with the filter's errno.
    table = syscall_table()
    probe = (
        "import ctypes, errno, json, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for name, (nr, args, _) in json.loads(sys.argv[1]).items():\n"
        "    padded = [*args, *[0] * (6 - len(args))]\n"
        "    r = libc.syscall(nr, *[ctypes.c_long(a) for a in padded])\n"
        "    if r == 0 and name.startswith('clone'):\n"
        "        os._exit(0)\n"
        "    code = ctypes.get_errno() if r == -1 else 0\n"
        "    print('CALL', name, errno.errorcode.get(code, code) if r == -1 else 'allowed')\n"
        "print('CALL getpid', 'allowed' if libc.syscall(39) > 0 else 'refused')\n"
    )
    command = f"python3 -c {shlex.quote(probe)} {shlex.quote(json.dumps(table))}"
    events = await h.run("ops", prompt=bash_script(h, "try-syscall", command))
    out = tool_output(events)
    answers = dict(line.split()[1:3] for line in out.splitlines() if line.startswith("CALL "))
    assert answers == {**{name: want for name, (_, _, want) in table.items()}, "getpid": "allowed"}


async def test_a_key_in_the_kernel_keyring_reaches_no_other_session(h: Harness) -> None:
    # add_key("user", "apkey", "KEYRING-SECRET", 14, KEY_SPEC_USER_KEYRING), then list the
    # keys the session can see.
    add = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "r = libc.syscall(248, b'user', b'apkey', b'KEYRING-SECRET', 14, ctypes.c_long(-4))\n"
        "print('ADD', r, ctypes.get_errno())\n"
    )
    planted = await h.run("ops", prompt=bash_script(h, "key-add", f"python3 -c {shlex.quote(add)}"))
    assert "ADD -1 1" in tool_output(planted)  # EPERM
    look = "cat /proc/keys 2>&1; cat /proc/key-users 2>&1; echo LOOKED"
    later = await h.run("worker", prompt=bash_script(h, "key-look", look))
    out = tool_output(later)
    assert "LOOKED" in out and "apkey" not in out and "KEYRING-SECRET" not in out


async def test_no_descriptor_of_the_server_is_open_inside(h: Harness) -> None:
    # Every descriptor of every process the agent can see, and the server's log (its
    # stderr, which bwrap and the CLI inherited before) through bwrap's pid 1.
    command = (
        'echo "S $AGENTPLANE_SESSION_DIR"; '
        'for f in /proc/[0-9]*/fd/*; do echo "FD $f $(readlink $f)"; done; '
        "cat /proc/1/fd/2 < /dev/null 2>&1 | head -c 300; echo; echo SCANNED"
    )
    server_stderr = os.readlink("/proc/self/fd/2")
    events = await h.run("ops", prompt=bash_script(h, "fds", command))
    out = tool_output(events)
    assert "SCANNED" in out
    assert "cat: /proc/1/fd/2: Permission denied" in out
    session_dir = out.split("S ", 1)[1].split("\n", 1)[0]
    # (An empty target: the process had gone, or is not the agent's to read: bwrap's.)
    targets = [line.split(" ", 2)[2] for line in out.splitlines() if line.startswith("FD ")]
    targets = [target for target in targets if target]
    assert any(target.startswith("pipe:") for target in targets), out
    ours = ("pipe:", "socket:", "anon_inode:", "/dev/", "/tmp", "/usr", "/run/agentplane/")
    for target in targets:
        assert target.startswith((*ours, session_dir)), target
        assert target != server_stderr, target
