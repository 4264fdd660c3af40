"""The line in Redis: one per event, shared by every worker and instance.

Every key of one event's line carries the hash tag `{<slug>}` (`line:{<slug>}:queue`, ...), so on a
Redis Cluster they live in one slot and each Lua script below runs atomically on one node.  The
set of events that have a line (`line:events`) is the one key outside it: each command on it is
alone.  REDIS_PREFIX goes in front of every name.

    line:{s}:seq        the last ticket given (INCR): join order
    line:{s}:queue      ZSET place id -> ticket, the places waiting
    line:{s}:seen       ZSET place id -> when its page last asked (ms), waiting places only
    line:{s}:gone       ZSET of tickets that left the queue other than at its head (left, sold out)
    line:{s}:admitting  ZSET place id -> when it was taken, then claimed (ms), until its order is made
    line:{s}:ready      LIST of place ids taken, in order, for any worker to claim and make the order
    line:{s}:done       ZSET of tickets whose turn ended (admitted or refused) since the last tick
    line:{s}:claimers   ZSET of the workers claiming lately -> when (ms): each claims its share
    line:{s}:latencies  LIST of admitted orders' answer times, reported by every worker, read by the admitter
    line:{s}:pre        SET of place ids that joined before sales opened (shuffled at opening)
    line:{s}:state      HASH tick, rate, share, outflow, outflow_ms, epoch, opened
    line:{s}:lease      the admitter's lease: its owner, expiring (SET NX PX)
    line:{s}:place:<id> HASH one place (24 h)
    line:{s}:key:<hash> the place an Idempotency-Key took (24 h)
    line:{s}:direct:<n> orders made at once (nobody waiting) in window n (DIRECT_WINDOW_MS)
    line:rate           the serving rate the service's last line averaged: where the next one starts
"""
import json

import redis

from ..notify.cluster_hub import is_cluster
from ..notify.redis_hub import RedisHub
from .local_store import DIRECT_WINDOW_MS, PLACE_TTL_SECONDS, Place

# Connections to Redis per worker for the line: every arriving order (600 a second at sales open) and every
# waiting page's turn is one script on it, and under a busy event loop each round trip holds its connection
# for a loop's turn.  The hub's 16 (its cache reads) queued joins for seconds and timed out into 503s.
POOL_SIZE = 128
LEARNED_RATE_TTL_SECONDS = 90 * 24 * 3600  # a rate learned at one sale still describes the service at the next
ACTIVE_MARK_MS = 1000  # an event's line is marked active (line:events) at most this often per process

# A place and where the line stands (its fields, the head, the tickets gone between them, the
# line's state and length), for the scripts below.  KEYS: seq queue seen gone pre state ... as _JOIN's.
_VIEW_OF = """
local function view_of(place_key)
  local fields = redis.call('HGETALL', place_key)
  if #fields == 0 then return nil end
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local head = first[2] and tonumber(first[2]) or (tonumber(redis.call('GET', KEYS[1]) or '0') + 1)
  local ticket = tonumber(redis.call('HGET', place_key, 'ticket'))
  return {fields, head, redis.call('ZCOUNT', KEYS[4], head, '(' .. ticket), redis.call('HGETALL', KEYS[6]),
          redis.call('ZCARD', KEYS[2])}
end
"""

# Join, or answer the place the key already holds.  A place that left gives its key back.
# KEYS: seq queue seen gone pre state place key (`line:{s}:key:` alone: no key) admitting; ARGV: id body body_hash
# order_key type quantity now_ms pre(0/1) force(0/1) ttl direct_floor direct_cap window_ms.  Returns {outcome, view_of(the place)}:
# outcome 0 no line, 1 joined, 2 existing.
_JOIN = _VIEW_OF + """
local keyed = string.sub(KEYS[8], -4) ~= 'key:'
if keyed then
  local existing = redis.call('GET', KEYS[8])
  if existing then
    local place_key = string.sub(KEYS[1], 1, -4) .. 'place:' .. existing
    local status = redis.call('HGET', place_key, 'status')
    if status and status ~= 'left' then return {2, view_of(place_key)} end
  end
end
if ARGV[9] ~= '1' and redis.call('ZCARD', KEYS[2]) == 0 and redis.call('ZCARD', KEYS[9]) == 0 then
  -- Nobody waits (nor waits for the order's making: made at once it would overtake them by up to two ticks):
  -- made at once, unless this window's share of the serving rate is taken (local_store.direct_allowance).
  local rate = math.max(tonumber(redis.call('HGET', KEYS[6], 'rate') or '0'), tonumber(ARGV[11]))
  if tonumber(ARGV[12]) > 0 then rate = math.min(rate, tonumber(ARGV[12])) end
  local window = string.sub(KEYS[1], 1, -4) .. 'direct:' .. math.floor(tonumber(ARGV[7]) / tonumber(ARGV[13]))
  local made = redis.call('INCR', window)
  if made == 1 then redis.call('PEXPIRE', window, 2 * tonumber(ARGV[13])) end
  if made <= math.max(math.floor(rate * tonumber(ARGV[13]) / 1000), 1) then return {0} end
end
local ticket = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[7], 'id', ARGV[1], 'ticket', ticket, 'status', 'queued', 'body', ARGV[2],
           'body_hash', ARGV[3], 'order_key', ARGV[4], 'type', ARGV[5], 'quantity', ARGV[6], 'joined_ms', ARGV[7],
           'pre', ARGV[8])
redis.call('EXPIRE', KEYS[7], ARGV[10])
redis.call('ZADD', KEYS[2], ticket, ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[1])
if ARGV[8] == '1' then redis.call('SADD', KEYS[5], ARGV[1]) end
if keyed then redis.call('SET', KEYS[8], ARGV[1], 'EX', ARGV[10]) end
return {1, view_of(KEYS[7])}
"""

# Read a place; a waiting place's page counts as having asked.  KEYS: seq queue seen gone pre state place;
# ARGV: id now_ms touch(0/1).
_VIEW = _VIEW_OF + """
if ARGV[3] == '1' and redis.call('ZSCORE', KEYS[2], ARGV[1]) then redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1]) end
return view_of(KEYS[7])
"""

# Places whose pages stopped asking: out of the queue, `left`.  KEYS: queue seen gone state; ARGV: cutoff_ms limit.
_SWEEP = """
local base = string.sub(KEYS[1], 1, -6)
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local version = 2 * tonumber(redis.call('HGET', KEYS[4], 'tick') or '0') + 1
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[2], id)
  local ticket = redis.call('ZSCORE', KEYS[1], id)
  if ticket then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[3], ticket, ticket)
    redis.call('HSET', base .. 'place:' .. id, 'status', 'left', 'version', version)
  end
end
return #ids
"""

# The next places in join order: out of the queue, onto the ready list for whichever worker claims
# them.  KEYS: queue seen admitting ready state; ARGV: n now_ms.  Returns when each taken place joined (ms).
_TAKE = """
local base = string.sub(KEYS[1], 1, -6)
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local joined = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[3], ARGV[2], id)
  redis.call('RPUSH', KEYS[4], id)
  redis.call('HSET', base .. 'place:' .. id, 'status', 'admitting')
  table.insert(joined, redis.call('HGET', base .. 'place:' .. id, 'joined_ms'))
end
redis.call('HSET', KEYS[5], 'batch', #ids)
return joined
"""

# A worker claims its share of the ready places (the last batch over the workers claiming lately), in
# order, and every place left over from an earlier batch: the workers tick out of step, and a worker whose
# tick slipped past the lead's missed a batch's share, which then waited at the list's head, claimed one
# a tick at the end of a line (a buyer admitted 7 s after the next ones).  KEYS: ready admitting state
# claimers; ARGV: owner now_ms horizon_ms room.  Returns their fields.
_CLAIM = """
local base = string.sub(KEYS[1], 1, -6)
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
local batch = tonumber(redis.call('HGET', KEYS[3], 'batch') or '1')
local left_over = math.max(redis.call('LLEN', KEYS[1]) - batch, 0)
local share = math.ceil(batch / redis.call('ZCARD', KEYS[4])) + left_over
local n = math.min(tonumber(ARGV[4]), math.max(share, 1))
local out = {}
if n < 1 then return out end
local ids = redis.call('LPOP', KEYS[1], n)
if not ids then return out end
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[2], ARGV[2], id)
  table.insert(out, redis.call('HGETALL', base .. 'place:' .. id))
end
return out
"""

# Places whose order began to be made (or was ready) before a cutoff and never finished: their
# worker died.  Taken back for the admitter to make again.  KEYS: admitting ready; ARGV: cutoff_ms now_ms
_RECLAIM = """
local base = string.sub(KEYS[1], 1, -10)
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])) do
  redis.call('LREM', KEYS[2], 0, id)
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  table.insert(out, redis.call('HGETALL', base .. 'place:' .. id))
end
return out
"""

# A place's outcome, and its ticket in the next tick's `done`.  KEYS: place admitting state done; ARGV: id status field json
_FINISH = """
local version = 2 * tonumber(redis.call('HGET', KEYS[3], 'tick') or '0') + 1
redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[3], ARGV[4], 'version', version)
redis.call('ZREM', KEYS[2], ARGV[1])
local ticket = redis.call('HGET', KEYS[1], 'ticket')
if ticket then redis.call('ZADD', KEYS[4], ticket, ticket) end
return version
"""

# Everyone waiting for `type` (or any, '') with at least `min_quantity` tickets is told at once.
# KEYS: queue seen gone state; ARGV: type min_quantity status error_json
_CLOSE = """
local base = string.sub(KEYS[1], 1, -6)
local version = 2 * tonumber(redis.call('HGET', KEYS[4], 'tick') or '0') + 1
local closed = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local place = base .. 'place:' .. id
  local found = redis.call('HMGET', place, 'type', 'quantity')
  if (ARGV[1] == '' or found[1] == ARGV[1]) and tonumber(found[2] or '0') >= tonumber(ARGV[2]) then
    local ticket = redis.call('ZSCORE', KEYS[1], id)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[3], ticket, ticket)
    redis.call('HSET', place, 'status', ARGV[3], 'error', ARGV[4], 'version', version)
    closed = closed + 1
  end
end
return closed
"""

# At sales_start: the pre-queue in a random order (Fisher-Yates over the tickets they hold, with
# the caller's random numbers), once per opening.  KEYS: queue pre state; ARGV: opening, then random numbers in [0, 1).
_SHUFFLE = """
if redis.call('HGET', KEYS[3], 'opened') == ARGV[1] then return -1 end
local base = string.sub(KEYS[1], 1, -6)
local ids, tickets = {}, {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local ticket = redis.call('ZSCORE', KEYS[1], id)
  if ticket then table.insert(ids, id); table.insert(tickets, tonumber(ticket)) end
end
for i = #ids, 2, -1 do
  local r = tonumber(ARGV[i + 1]) or math.random()
  local j = math.floor(r * i) + 1
  ids[i], ids[j] = ids[j], ids[i]
end
table.sort(tickets)
for i, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], tickets[i], id)
  redis.call('HSET', base .. 'place:' .. id, 'ticket', tickets[i])
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[3], 'opened', ARGV[1])
redis.call('HINCRBY', KEYS[3], 'epoch', 1)
return #ids
"""

# One move of the line: the tick, the measured rate, the tickets gone ahead of the head trimmed, the
# tickets done since the last tick taken.  KEYS: queue gone state seq admitting done; ARGV: rate share outflow outflow_ms.
# Returns {tick, head, length, {gone...}, epoch, admitting, {done...}}.
_ADVANCE = """
local tick = redis.call('HINCRBY', KEYS[3], 'tick', 1)
redis.call('HSET', KEYS[3], 'rate', ARGV[1], 'share', ARGV[2], 'outflow', ARGV[3], 'outflow_ms', ARGV[4])
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local head = first[2] and tonumber(first[2]) or (tonumber(redis.call('GET', KEYS[4]) or '0') + 1)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. head)
local done = redis.call('ZRANGE', KEYS[6], 0, -1)
redis.call('DEL', KEYS[6])
return {tick, head, redis.call('ZCARD', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1),
        redis.call('HGET', KEYS[3], 'epoch') or '0', redis.call('ZCARD', KEYS[5]), done}
"""

# The lease: taken when free, renewed by its owner.  KEYS: lease; ARGV: owner ttl_ms
_LEASE = """
local owner = redis.call('GET', KEYS[1])
if owner == false or owner == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# An event leaves `line:events` only when nobody joined it for a while (a join re-adds it).
_FORGET = """
local since = redis.call('ZSCORE', KEYS[1], ARGV[1])
if since and tonumber(since) < tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _fields(flat):
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


class RedisLineStore:
    """The line's atomic steps as Lua scripts on the hub's Redis (one Redis, or the event's cluster node)."""

    shared = True

    def __init__(self, url, prefix=""):
        self.prefix = prefix
        self._active_marked = {}  # slug -> when this process last marked the event's line active (ms)
        if is_cluster(url):
            self._client = redis.RedisCluster.from_url(url, socket_timeout=2, socket_connect_timeout=1)
        else:
            self._client = RedisHub.cache_client(url, max_connections=POOL_SIZE)
        self._scripts = {name: self._client.register_script(source) for name, source in (
            ("join", _JOIN), ("view", _VIEW), ("sweep", _SWEEP), ("take", _TAKE), ("claim", _CLAIM),
            ("reclaim", _RECLAIM), ("finish", _FINISH),
            ("close", _CLOSE), ("shuffle", _SHUFFLE), ("advance", _ADVANCE), ("lease", _LEASE),
            ("release", _RELEASE), ("forget", _FORGET))}

    def _key(self, slug, name):
        return f"{self.prefix}line:{{{slug}}}:{name}"

    def _run(self, script, slug, names, args):
        return self._scripts[script](keys=[self._key(slug, name) for name in names], args=args)

    @property
    def _events(self):
        return f"{self.prefix}line:events"

    def learned_rate(self):
        """The serving rate the service's last line averaged (line:rate), or None before any line."""
        value = self._client.get(f"{self.prefix}line:rate")
        return float(value) if value is not None else None

    def learn_rate(self, rate):
        self._client.set(f"{self.prefix}line:rate", repr(rate), ex=LEARNED_RATE_TTL_SECONDS)

    # -- joining and reading --

    def join(self, slug, place, key_hash, now_ms, pre, force, direct=(0, 0)):
        """Join, or find the place `key_hash` holds: (outcome, Place, view), the outcome "joined" or
        "existing"; ("none", None, None) when the line is empty, `force` is not set and the orders made at
        once this window are within the serving rate (`direct`: its floor and cap, local_store.direct_allowance)."""
        reply = self._run("join", slug, self._names(f"place:{place['id']}", f"key:{key_hash or ''}", "admitting"),
                          (place["id"], place["body"], place["body_hash"], place["order_key"], place["type"],
                           place["quantity"], now_ms, int(pre), int(force), PLACE_TTL_SECONDS, *direct,
                           DIRECT_WINDOW_MS))
        outcome = ("none", "joined", "existing")[reply[0]]
        if outcome == "none":
            return outcome, None, None
        if outcome == "joined" and now_ms - self._active_marked.get(slug, 0) >= ACTIVE_MARK_MS:
            # Once a second per event and worker, not per join: the admitters only need to know it is alive.
            self._client.zadd(self._events, {slug: now_ms})
            self._active_marked[slug] = now_ms
        return (outcome, *_view(reply[1]))

    def view(self, slug, place_id, now_ms, touch=True):
        """(Place, view) or None for an unknown place; a waiting place is marked as asked for."""
        reply = self._run("view", slug, self._names(f"place:{place_id}"), (place_id, now_ms, int(touch)))
        return _view(reply) if reply is not None else None

    @staticmethod
    def _names(*more):
        return ("seq", "queue", "seen", "gone", "pre", "state", *more)

    def touch(self, slug, place_ids, now_ms):
        if place_ids:
            self._client.zadd(self._key(slug, "seen"), {place_id: now_ms for place_id in place_ids}, xx=True)

    def summary(self, slug):
        """{length, state...} of the event's line, for the event's page and the operator."""
        pipe = self._client.pipeline(transaction=False)
        pipe.zcard(self._key(slug, "queue"))
        pipe.hgetall(self._key(slug, "state"))
        length, state = pipe.execute()
        return {"length": int(length), **_state({_text(k): _text(v) for k, v in state.items()})}

    # -- the admitter's steps --

    def lease(self, slug, owner, ttl_ms):
        return bool(self._run("lease", slug, ("lease",), (owner, ttl_ms)))

    def release(self, slug, owner):
        self._run("release", slug, ("lease",), (owner,))

    def active_events(self):
        return [_text(slug) for slug in self._client.zrange(self._events, 0, -1)]

    def forget_event(self, slug, idle_before_ms):
        self._client.eval(_FORGET, 1, self._events, slug, idle_before_ms)

    def sweep(self, slug, cutoff_ms, limit):
        return int(self._run("sweep", slug, ("queue", "seen", "gone", "state"), (cutoff_ms, limit)))

    def take(self, slug, count, now_ms):
        if count <= 0:
            return []
        return [int(joined) for joined in self._run("take", slug, ("queue", "seen", "admitting", "ready", "state"),
                                                     (count, now_ms))]

    def claim(self, slug, owner, now_ms, horizon_ms, room):
        replies = self._run("claim", slug, ("ready", "admitting", "state", "claimers"), (owner, now_ms, horizon_ms, room))
        return [Place.from_fields(_fields(reply)) for reply in replies]

    def reclaim(self, slug, before_ms, now_ms):
        """Places whose order began to be made before `before_ms` and never finished (a worker died)."""
        replies = self._run("reclaim", slug, ("admitting", "ready"), (before_ms, now_ms))
        return [Place.from_fields(_fields(reply)) for reply in replies]

    def report(self, slug, latencies):
        """This worker's admitted orders' answer times, for the admitter's outflow."""
        key = self._key(slug, "latencies")
        pipe = self._client.pipeline(transaction=False)
        pipe.rpush(key, *(f"{seconds:.4f}" for seconds in latencies))
        pipe.ltrim(key, -LATENCIES_KEPT, -1)
        pipe.execute()

    def latencies(self, slug):
        """Every answer time reported since the last call (and no longer kept)."""
        key = self._key(slug, "latencies")
        pipe = self._client.pipeline(transaction=True)
        pipe.lrange(key, 0, -1)
        pipe.delete(key)
        return [float(value) for value in pipe.execute()[0]]

    def finish(self, slug, place_id, status, field, value):
        return int(self._run("finish", slug, (f"place:{place_id}", "admitting", "state", "done"),
                             (place_id, status, field, json.dumps(value, separators=(",", ":")))))

    def close(self, slug, ticket_type, min_quantity, status, error):
        return int(self._run("close", slug, ("queue", "seen", "gone", "state"),
                             (ticket_type or "", min_quantity, status, json.dumps(error, separators=(",", ":")))))

    def shuffle(self, slug, opening, randoms):
        return int(self._run("shuffle", slug, ("queue", "pre", "state"), [opening, *randoms]))

    def pre_queue_size(self, slug):
        return self._client.scard(self._key(slug, "pre"))

    def advance(self, slug, rate, share, outflow, now_ms):
        tick, head, length, gone, epoch, admitting, done = self._run(
            "advance", slug, ("queue", "gone", "state", "seq", "admitting", "done"),
            (repr(rate), repr(share), repr(outflow), int(now_ms)))
        return {"tick": int(tick), "head": int(head), "length": int(length), "gone": sorted(int(t) for t in gone),
                "epoch": int(epoch), "admitting": int(admitting), "done": sorted(int(t) for t in done)}

    def ready(self):
        try:
            self._client.ping()
        except (redis.RedisError, OSError) as exc:
            return False, f"line: {exc}"
        return True, "line"


def _view(reply):
    fields, head, gone_ahead, state, length = reply
    return Place.from_fields(_fields(fields)), {"head": int(head), "gone_ahead": int(gone_ahead),
                                                "length": int(length), **_state(_fields(state))}


def _state(fields):
    return {"tick": int(fields.get("tick") or 0), "rate": float(fields.get("rate") or 0),
            "share": float(fields.get("share") or 0), "outflow": float(fields.get("outflow") or 0),
            "outflow_ms": int(fields.get("outflow_ms") or 0),
            "epoch": int(fields.get("epoch") or 0),
            "opened": fields.get("opened")}


STORE_ERRORS = (redis.RedisError, OSError)
LATENCIES_KEPT = 2000
