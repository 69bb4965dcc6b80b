"""ListSessions page tokens: opaque keyset cursors bound to the filters they were made for."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import datetime, timedelta

from ...errors import InvalidArgument
from ...store.sessions import SessionFilter
from ..run_request import is_session_id


def _filter_digest(flt: SessionFilter) -> str:
    body = json.dumps(
        [
            flt.state.value if flt.state else None,
            flt.created_from.isoformat() if flt.created_from else None,
            flt.created_before.isoformat() if flt.created_before else None,
            sorted(flt.labels),
            # Only when set, so tokens issued before the filter existed stay valid.
            *(["awaiting"] if flt.awaiting else []),
            *(["paused"] if flt.paused else []),
        ]
    )
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def encode_token(created: datetime, session_id: str, flt: SessionFilter) -> str:
    """The position after the last session shown (its creation time and id)."""
    body = json.dumps({"c": created.isoformat(), "i": session_id, "f": _filter_digest(flt)})
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_token(token: str, flt: SessionFilter) -> tuple[datetime, str]:
    """The position a token stands for; InvalidArgument on `page_token` if it is not one
    this server issued, or was issued for other filters."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        created, session_id, digest = datetime.fromisoformat(body["c"]), body["i"], body["f"]
        # Tokens carry the UTC time of a session this server listed, never another.
        if created.utcoffset() != timedelta(0) or not is_session_id(session_id):
            raise ValueError(token)
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError):
        raise InvalidArgument("page_token", "is not a token this server issued") from None
    if digest != _filter_digest(flt):
        raise InvalidArgument("page_token", "was issued for different filters")
    return created, str(session_id)
