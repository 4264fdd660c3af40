"""The line in the process (no REDIS_URL: SQLite, one worker).

The same steps as redis_store.RedisLineStore, each atomic because nothing in it yields to
another greenlet.  A restart of the process loses the line: without Redis there is one worker
and nothing to share it with (API.md: "Without Redis, in the process").
"""
import bisect
import collections
import dataclasses
import json
import random
import time

PLACE_TTL_SECONDS = 24 * 3600  # as long as an Idempotency-Key answers (orders.service.IDEMPOTENCY_KEY_TTL)
# Orders made at once (no line) are counted in windows this long: at most the serving rate's share of each.
DIRECT_WINDOW_MS = 250


def direct_allowance(rate, floor, cap):
    """Orders one DIRECT_WINDOW_MS window may make at once: the serving rate (at least `floor`, at most `cap`)."""
    rate = max(rate, floor)
    if cap:
        rate = min(rate, cap)
    return max(int(rate * DIRECT_WINDOW_MS / 1000), 1)


@dataclasses.dataclass
class Place:
    """One place in a line, as either store keeps it."""

    id: str
    ticket: int
    status: str  # queued, admitting, admitted, sold_out, refused, left
    body: str  # the order's body as POST got it (validated), JSON
    body_hash: str
    order_key: str  # the Idempotency-Key its order is made with: made once, however often it is tried
    type: str
    quantity: int
    joined_ms: int
    pre: bool = False
    version: int = 0  # once it is no longer waiting
    order: dict | None = None
    error: dict | None = None

    @classmethod
    def from_fields(cls, fields):
        """From a Redis hash's fields (strings)."""
        return cls(id=fields["id"], ticket=int(fields["ticket"]), status=fields["status"], body=fields["body"],
                   body_hash=fields["body_hash"], order_key=fields["order_key"], type=fields["type"],
                   quantity=int(fields["quantity"]), joined_ms=int(fields["joined_ms"]), pre=fields.get("pre") == "1",
                   version=int(fields.get("version") or 0),
                   order=json.loads(fields["order"]) if fields.get("order") else None,
                   error=json.loads(fields["error"]) if fields.get("error") else None)


class _Line:
    def __init__(self):
        self.seq = 0
        self.queue = {}  # id -> ticket, in ticket order (insertion order; re-sorted after the shuffle)
        self.seen = {}  # id -> ms, waiting places only
        self.gone = []  # sorted tickets that left other than at the head
        self.admitting = {}  # id -> ms
        self.done = []  # tickets whose turn ended (admitted or refused) since the last tick
        self.ready = collections.deque()  # ids taken, in order, not yet claimed
        self.latencies = []
        self.pre = set()
        self.state = {"tick": 0, "rate": 0.0, "share": 0.0, "outflow": 0.0, "outflow_ms": 0, "epoch": 0, "opened": None}
        self.lease = None  # (owner, expires at)
        self.last_join_ms = 0
        self.direct = (None, 0)  # (window, orders made at once in it)

    def head(self):
        return next(iter(self.queue.values())) if self.queue else self.seq + 1

    def final_version(self):
        return 2 * self.state["tick"] + 1


class LocalLineStore:
    shared = False

    def __init__(self):
        self._lines = {}  # slug -> _Line
        self._places = {}  # id -> Place
        self._keys = {}  # (slug, key hash) -> place id
        self._learned_rate = None

    def _line(self, slug):
        line = self._lines.get(slug)
        if line is None:
            line = self._lines[slug] = _Line()
        return line

    def join(self, slug, place, key_hash, now_ms, pre, force, direct=(0, 0)):
        line = self._line(slug)
        existing = self._places.get(self._keys.get((slug, key_hash))) if key_hash else None
        if existing is not None and existing.status != "left":
            return ("existing", *self.view(slug, existing.id, now_ms, touch=False))
        if not force and not line.queue and not line.admitting:  # nobody waits, nor waits for the order's making
            window, made = line.direct
            window_now = now_ms // DIRECT_WINDOW_MS
            made = made + 1 if window == window_now else 1
            line.direct = (window_now, made)
            if made <= direct_allowance(line.state["rate"], *direct):
                return "none", None, None
        line.seq += 1
        joined = Place(id=place["id"], ticket=line.seq, status="queued", body=place["body"],
                       body_hash=place["body_hash"], order_key=place["order_key"], type=place["type"],
                       quantity=int(place["quantity"]), joined_ms=now_ms, pre=pre)
        self._places[joined.id] = joined
        line.queue[joined.id] = joined.ticket
        line.seen[joined.id] = now_ms
        line.last_join_ms = now_ms
        if pre:
            line.pre.add(joined.id)
        if key_hash:
            self._keys[(slug, key_hash)] = joined.id
        return ("joined", *self.view(slug, joined.id, now_ms, touch=False))

    def view(self, slug, place_id, now_ms, touch=True):
        place = self._places.get(place_id)
        if place is None:
            return None
        line = self._line(slug)
        head = line.head()
        if touch and place_id in line.queue:
            line.seen[place_id] = now_ms
        gone_ahead = bisect.bisect_left(line.gone, place.ticket) - bisect.bisect_left(line.gone, head)
        return dataclasses.replace(place), {"head": head, "gone_ahead": max(gone_ahead, 0),
                                            "length": len(line.queue), **line.state}

    def touch(self, slug, place_ids, now_ms):
        line = self._line(slug)
        for place_id in place_ids:
            if place_id in line.seen:
                line.seen[place_id] = now_ms

    def summary(self, slug):
        line = self._line(slug)
        return {"length": len(line.queue), **line.state}

    def learned_rate(self):
        return self._learned_rate

    def learn_rate(self, rate):
        self._learned_rate = rate

    def lease(self, slug, owner, ttl_ms):
        line = self._line(slug)
        now = time.monotonic()
        if line.lease is None or line.lease[0] == owner or line.lease[1] < now:
            line.lease = (owner, now + ttl_ms / 1000)
            return True
        return False

    def release(self, slug, owner):
        line = self._line(slug)
        if line.lease is not None and line.lease[0] == owner:
            line.lease = None

    def active_events(self):
        return list(self._lines)

    def forget_event(self, slug, idle_before_ms):
        line = self._lines.get(slug)
        if line is not None and not line.queue and not line.admitting and line.last_join_ms < idle_before_ms:
            del self._lines[slug]

    def _remove(self, line, place, status, **values):
        del line.queue[place.id]
        line.seen.pop(place.id, None)
        bisect.insort(line.gone, place.ticket)
        place.status, place.version = status, line.final_version()
        for name, value in values.items():
            setattr(place, name, value)

    def sweep(self, slug, cutoff_ms, limit):
        line = self._line(slug)
        departed = [place_id for place_id, seen in line.seen.items() if seen <= cutoff_ms][:limit]
        for place_id in departed:
            self._remove(line, self._places[place_id], "left")
        return len(departed)

    def take(self, slug, count, now_ms):
        line = self._line(slug)
        joined = []
        for place_id in list(line.queue)[:max(count, 0)]:
            del line.queue[place_id]
            line.seen.pop(place_id, None)
            line.admitting[place_id] = now_ms
            line.ready.append(place_id)
            place = self._places[place_id]
            place.status = "admitting"
            joined.append(place.joined_ms)
        return joined

    def claim(self, slug, owner, now_ms, horizon_ms, room):
        line = self._line(slug)  # one worker: it claims every ready place it has room for
        claimed = []
        while line.ready and len(claimed) < room:
            place_id = line.ready.popleft()
            line.admitting[place_id] = now_ms
            claimed.append(dataclasses.replace(self._places[place_id]))
        return claimed

    def reclaim(self, slug, before_ms, now_ms):
        line = self._line(slug)
        stalled = [place_id for place_id, since in line.admitting.items() if since <= before_ms]
        for place_id in stalled:
            if place_id in line.ready:
                line.ready.remove(place_id)
            line.admitting[place_id] = now_ms
        return [dataclasses.replace(self._places[place_id]) for place_id in stalled]

    def report(self, slug, latencies):
        self._line(slug).latencies.extend(latencies)

    def latencies(self, slug):
        line = self._line(slug)
        reported, line.latencies = line.latencies, []
        return reported

    def finish(self, slug, place_id, status, field, value):
        line = self._line(slug)
        place = self._places[place_id]
        place.status, place.version = status, line.final_version()
        setattr(place, field, value)
        line.admitting.pop(place_id, None)
        line.done.append(place.ticket)
        return place.version

    def close(self, slug, ticket_type, min_quantity, status, error):
        line = self._line(slug)
        closing = [self._places[place_id] for place_id in line.queue]
        closing = [place for place in closing
                   if (not ticket_type or place.type == ticket_type) and place.quantity >= min_quantity]
        for place in closing:
            self._remove(line, place, status, error=error)
        return len(closing)

    def shuffle(self, slug, opening, randoms):
        line = self._line(slug)
        if line.state["opened"] == opening:
            return -1
        ids = [place_id for place_id in line.pre if place_id in line.queue]
        tickets = sorted(line.queue[place_id] for place_id in ids)
        random.SystemRandom().shuffle(ids)
        for place_id, ticket in zip(ids, tickets):
            line.queue[place_id] = self._places[place_id].ticket = ticket
        line.queue = dict(sorted(line.queue.items(), key=lambda item: item[1]))
        line.pre.clear()
        line.state["opened"] = opening
        line.state["epoch"] += 1
        return len(ids)

    def pre_queue_size(self, slug):
        return len(self._line(slug).pre)

    def advance(self, slug, rate, share, outflow, now_ms):
        line = self._line(slug)
        line.state.update(tick=line.state["tick"] + 1, rate=rate, share=share, outflow=outflow, outflow_ms=now_ms)
        head = line.head()
        del line.gone[:bisect.bisect_left(line.gone, head)]
        done, line.done = sorted(line.done), []
        return {"tick": line.state["tick"], "head": head, "length": len(line.queue), "gone": list(line.gone),
                "epoch": line.state["epoch"], "admitting": len(line.admitting), "done": done}

    def ready(self):
        return True, "line in-process"


STORE_ERRORS = ()
