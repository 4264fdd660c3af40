"""Time as the service keeps it: aware datetimes in UTC."""
from datetime import datetime, timedelta, timezone


def utcnow():
    return datetime.now(timezone.utc)


def as_utc(moment):
    # SQLite hands back naive datetimes; we only ever store UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def from_iso(iso):
    """The API's ISO 8601 (a "Z" for UTC) as an aware datetime."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


# Events are in Kenya; customers and organizers read times in Nairobi time whatever their device says.
# Kenya keeps UTC+3 all year, so a fixed offset needs no tz database on the host.
EAST_AFRICA = timezone(timedelta(hours=3), "EAT")


def east_africa_time(moment):
    """`moment` (aware, naive UTC, or ISO 8601) as people in Kenya read it: Sun 14 February 2027, 7:00 pm EAT."""
    if isinstance(moment, str):
        moment = from_iso(moment)
    local = as_utc(moment).astimezone(EAST_AFRICA)
    hour = local.strftime("%I").lstrip("0")
    return f"{local:%a %d %B %Y}, {hour}:{local:%M %p} EAT".replace("AM", "am").replace("PM", "pm")
