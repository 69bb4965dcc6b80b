"""Telemetry must not break what it watches: a failure in it is logged and swallowed."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def never_raises(method: F) -> F:
    """`method`, except that an exception in it is logged (`telemetry_failed`) and it
    returns None instead."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception:  # any failure: log it, keep the session or the call going
            log.exception("telemetry_failed")
            return None

    return wrapper  # type: ignore[return-value]
