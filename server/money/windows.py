"""Day windows in a tenant's time zone."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo


def day_of(instant: datetime, time_zone: str) -> date:
    """The window day an instant falls in."""
    return instant.astimezone(ZoneInfo(time_zone)).date()


def window_bounds(day: date, time_zone: str) -> tuple[datetime, datetime]:
    """The window's first instant and the instant after its last, in UTC."""
    tz = ZoneInfo(time_zone)
    start = datetime.combine(day, time.min, tzinfo=tz)
    end = datetime.combine(day + timedelta(days=1), time.min, tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)
