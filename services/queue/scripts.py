"""Lua scripts: every multi-key state change of the queue is one atomic script.

Both the sync (engine) and the async (client) side register these same sources.
Stream field encoding stays in Python (``codec``); scripts receive encoded fields
as flat argument lists and never interpret them, except the request id of an
entry that must be dead-lettered.
"""

from __future__ import annotations

import enum

# Releasing a request: ack and delete its entry (the stream then holds only unfinished
# work) and free its admission slot. Only the first release of an entry frees the slot,
# so a zombie engine finishing a request again cannot free a slot twice.
_RELEASE = """
local function release(requests, active, cancelled, group, entry_id, request_id)
  redis.call('XACK', requests, group, entry_id)
  redis.call('XDEL', requests, entry_id)
  if redis.call('HGET', active, request_id) ~= entry_id then
    return 0
  end
  redis.call('HDEL', active, request_id)
  redis.call('SREM', cancelled, request_id)
  return 1
end
"""

# KEYS: requests, active, idempotency, stream metadata, detokenizer assignments
# ARGV: request_id, max_depth, idempotency_ttl_ms, group, stream_metadata, detokenizer group,
#       field, value, ...
# Returns {'accepted', entry_id} | {'duplicate', entry_id} | {'full', depth}.
# The stream metadata (model, stop strings, prompt length) tells the detokenizer how to
# render the request, and lets a client that lost its stream resume it by request id alone;
# it lives as long as the idempotency marker.
_ENQUEUE = """
local request_id = ARGV[1]
local known = redis.call('GET', KEYS[3]) or redis.call('HGET', KEYS[2], request_id)
if known then
  return {'duplicate', known}
end
local depth = redis.call('HLEN', KEYS[2])
if depth >= tonumber(ARGV[2]) then
  return {'full', depth}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  -- group from id 0: nothing appended from here on can be missed by the engines
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[4], '0', 'MKSTREAM')
end
local entry_id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 7))
if redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[5], ARGV[6], '0', 'MKSTREAM')
end
-- the same accept hands the request's text to exactly one detokenizer replica
redis.call('XADD', KEYS[5], '*', 'id', request_id)
redis.call('HSET', KEYS[2], request_id, entry_id)
redis.call('SET', KEYS[3], entry_id, 'PX', ARGV[3])
redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[3])
return {'accepted', entry_id}
"""

# KEYS: requests, active, cancelled
# ARGV: group, entry_id, request_id
# Returns 1 when this call freed the admission slot, 0 when it was already free.
_FINISH = (
    _RELEASE
    + """
return release(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
"""
)

# KEYS: active, cancelled
# ARGV: request_id
# Only active requests are marked, so the cancelled set never outlives its requests.
_CANCEL = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('SADD', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# KEYS: requests
# ARGV: group, consumer, entry_id, ...
# Resets the idle time of the entries this consumer still holds and returns their ids.
# An entry another engine reclaimed is left alone: renewing it would steal it back.
_RENEW = """
local held = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    held[#held + 1] = ARGV[i]
  end
end
return held
"""

# KEYS: requests
# ARGV: group, consumer, idle_ms, entry_id, ...
# Hands back the entries this consumer still holds, idle enough for the next reclaim to take
# them at once. The delivery count goes down by one: the next reclaim adds it back, so a
# replica stopping cleanly does not count against the request's max_deliveries.
_HAND_BACK = """
local handed = 0
for i = 4, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3],
               'RETRYCOUNT', math.max(pending[1][4] - 1, 0), 'JUSTID')
    handed = handed + 1
  end
end
return handed
"""

# KEYS: requests
# ARGV: group, consumer, min_idle_ms, max_count
# Returns {{entry_id, delivery_count, {field, value, ...}}, ...}. The cursor loop matters:
# XAUTOCLAIM scans a bounded slice of the pending list per call, and expired entries may
# sit behind many live ones.
_RECLAIM = """
local wanted = tonumber(ARGV[4])
local cursor = '0-0'
local claimed = {}
repeat
  local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], cursor,
                           'COUNT', wanted - #claimed)
  cursor = reply[1]
  for _, entry in ipairs(reply[2]) do
    if entry then
      local pending = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
      claimed[#claimed + 1] = {entry[1], pending[1][4], entry[2]}
    end
  end
until cursor == '0-0' or #claimed >= wanted
return claimed
"""

# KEYS: requests, active, cancelled, dead, output
# ARGV: group, entry_id, request_id ('' when unreadable), output_ttl_ms, dead_max_len,
#       reason, deliveries, error-chunk field, value, ...
# Records the entry in the dead-letter stream, ends its output with the error chunk
# (only while the request is still active: a finished request keeps its real ending),
# and releases it so that it is never handed out again.
_DEAD_LETTER = (
    _RELEASE
    + """
local original = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
local fields = {}
if original[1] then
  fields = original[1][2]
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*',
           'entry_id', ARGV[2], 'reason', ARGV[6], 'deliveries', ARGV[7], unpack(fields))
if ARGV[3] ~= '' and redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[2] then
  redis.call('XADD', KEYS[5], '*', unpack(ARGV, 8))
  redis.call('PEXPIRE', KEYS[5], ARGV[4])
end
return release(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
"""
)


class LuaScript(enum.Enum):
    ENQUEUE = _ENQUEUE
    FINISH = _FINISH
    CANCEL = _CANCEL
    RENEW = _RENEW
    RECLAIM = _RECLAIM
    HAND_BACK = _HAND_BACK
    DEAD_LETTER = _DEAD_LETTER
