"""Host uids for sessions: one per live session across every server of the host."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from agentplane.server.sandbox.uids import NoFreeUid, UidPool, parse_range, taken_by_users


def test_no_two_holders_share_a_uid_and_a_released_one_returns(tmp_path: Path) -> None:
    replica_a = UidPool(tmp_path / "uids", 3_000_000, 3_000_001)
    replica_b = UidPool(tmp_path / "uids", 3_000_000, 3_000_001)  # another server, same host
    first, second = replica_a.acquire(), replica_b.acquire()
    assert {first.uid, second.uid} == {3_000_000, 3_000_001}
    with pytest.raises(NoFreeUid, match="3000000-3000001"):
        replica_a.acquire()
    second.release()
    assert replica_a.acquire().uid == second.uid


def test_a_dead_servers_uids_are_free_again(tmp_path: Path) -> None:
    # A server killed with SIGKILL lets go of its uids with its descriptors.
    holder = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from agentplane.server.sandbox.uids import UidPool\n"
        f"lease = UidPool(Path({str(tmp_path / 'uids')!r}), 3_000_000, 3_000_000).acquire()\n"
        "print(lease.uid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", holder], check=False, capture_output=True, text=True
    )
    assert done.returncode == -9 and done.stdout.strip() == "3000000"
    assert UidPool(tmp_path / "uids", 3_000_000, 3_000_000).acquire().uid == 3_000_000


def test_a_lock_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "uids"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by another user"):
        UidPool(folder, 3_000_000, 3_000_001)


@pytest.mark.parametrize("raw", ["", "5", "a-b", "999-2000", "2000-1000", "1000-4294967295"])
def test_bad_ranges_are_refused(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_range(raw)


def test_the_users_in_a_range_are_named() -> None:
    assert "nobody" in taken_by_users(65534, 65534)
    assert taken_by_users(3_000_000, 3_065_535) == []
