"""Lua scripts: every multi-key state change of the queue is one atomic script.

Both the sync (engine) and the async (client) side register these same sources.
Stream field encoding stays in Python (``codec``); scripts receive encoded fields
as flat argument lists and never interpret them, except the request id of an
entry (to dead-letter it, and for the claim to say whether a client cancelled it) and the
length of a packed prompt, which tells the claim whether a request fits the engine's free
KV blocks.
"""

from __future__ import annotations

import enum

# Releasing a request: ack and delete its entry (the stream then holds only unfinished
# work) and free its admission slot. Only the first release of an entry frees the slot,
# so a zombie engine finishing a request again cannot free a slot twice.
_RELEASE = """
local function release(requests, active, cancelled, group, entry_id, ticket, request_id)
  redis.call('XACK', requests, group, entry_id)
  redis.call('XDEL', requests, entry_id)
  if redis.call('HGET', active, request_id) ~= ticket then
    return 0
  end
  redis.call('HDEL', active, request_id)
  redis.call('SREM', cancelled, request_id)
  return 1
end
"""

# A ticket names an entry across bands (see keys): the bare id in band 0, 'priority/id' elsewhere.
_TICKET = """
local function ticket_of(priority, entry_id)
  if tonumber(priority) == 0 then
    return entry_id
  end
  return priority .. '/' .. entry_id
end
"""

# KEYS: band stream, active, idempotency, stream metadata, ready, doorbell, detokenizer assignments
# ARGV: request_id, max_depth, idempotency_ttl_ms, group, stream_metadata, priority,
#       detokenizer group, field, value, ...
# Returns {'accepted', ticket, depth after it} | {'duplicate', ticket} | {'full', depth}.
# The stream metadata (model, stop strings, prompt length) tells the detokenizer how to
# render the request, and lets a client that lost its stream resume it by request id alone;
# it lives as long as the idempotency marker.
# The admission bound counts every band: ``active`` is one hash per model.
_ENQUEUE = (
    _TICKET
    + """
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
local ticket = ticket_of(ARGV[6], redis.call('XADD', KEYS[1], '*', unpack(ARGV, 8)))
if redis.call('EXISTS', KEYS[7]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[7], ARGV[7], '0', 'MKSTREAM')
end
-- the same accept hands the request's text to exactly one detokenizer replica
redis.call('XADD', KEYS[7], '*', 'id', request_id)
redis.call('HSET', KEYS[2], request_id, ticket)
redis.call('SET', KEYS[3], ticket, 'PX', ARGV[3])
redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[6])
redis.call('XADD', KEYS[6], 'MAXLEN', '1', '*', 'p', ARGV[6])
return {'accepted', ticket, depth + 1}
"""
)

# KEYS: ready, doorbell, cancelled, band stream of each priority from the most urgent on
# ARGV: group, consumer, max_count, free_blocks, block_size, total_blocks, first priority
# Returns {doorbell id, {{ticket, {field, value, ...}, cancelled (1 or 0)}, ...}}: whether a
# client cancelled the request before an engine got it comes in the same round trip.
# Takes undelivered entries in priority order, then arrival order, while each one's prompt
# fits the free KV blocks: ceil((prompt + 1) / block_size). It peeks (XRANGE after the group's
# last delivered id) before it delivers, so an entry that does not fit is never held by this
# engine. The first entry that does not fit ends the claim, as in the engine's scheduler: a
# large request is not starved by smaller, less urgent ones. An entry larger than the whole KV
# cache can never fit; it is delivered so that the engine ends it with an error. A band whose
# entries are all delivered leaves ``ready``. The doorbell id lets an idle engine block until
# the next enqueue without missing one that happens in between.
_CLAIM = (
    _TICKET
    + """
local group, consumer = ARGV[1], ARGV[2]
local wanted, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local block_size, total, first = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local function last_delivered(stream)
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local fields = {}
    for i = 1, #info, 2 do
      fields[info[i]] = info[i + 1]
    end
    if fields['name'] == group then
      return fields['last-delivered-id']
    end
  end
  return nil
end
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then
      return fields[i + 1]
    end
  end
  return nil
end
local function prompt_tokens(fields)
  local packed = field(fields, 'p')
  return packed and #packed / 4 or 0
end
local function cancelled(fields)
  local request_id = field(fields, 'id')
  return request_id and redis.call('SISMEMBER', KEYS[3], request_id) or 0
end
local claimed, blocked = {}, false
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if blocked or #claimed >= wanted then
    break
  end
  local stream = KEYS[4 + tonumber(member) - first]
  local last = stream and redis.call('EXISTS', stream) == 1 and last_delivered(stream)
  if not last then
    redis.call('ZREM', KEYS[1], member)
  else
    local room = wanted - #claimed
    local waiting = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', room + 1)
    local take = 0
    for _, entry in ipairs(waiting) do
      local need = math.ceil((prompt_tokens(entry[2]) + 1) / block_size)
      if take >= room then
        break
      elseif need > total then
        need = 0
      elseif need > budget then
        blocked = true
        break
      end
      budget = budget - need
      take = take + 1
    end
    if take > 0 then
      local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', take, 'STREAMS', stream, '>')
      for _, entry in ipairs(reply[1][2]) do
        claimed[#claimed + 1] = {ticket_of(member, entry[1]), entry[2], cancelled(entry[2])}
      end
    end
    if take == #waiting then
      redis.call('ZREM', KEYS[1], member)
    end
  end
end
local bell = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
return {bell[1] and bell[1][1] or '0-0', claimed}
"""
)

# KEYS: band stream, active, cancelled
# ARGV: group, entry_id, request_id, ticket
# Returns 1 when this call freed the admission slot, 0 when it was already free.
_FINISH = (
    _RELEASE
    + """
return release(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[4], ARGV[3])
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

# KEYS: the band streams the entries are in
# ARGV: group, consumer, (key index, entry_id), ...
# Resets the idle time of the entries this consumer still holds and returns their positions
# (1-based, in argument order). An entry another engine reclaimed is left alone: renewing it
# would steal it back.
_RENEW = """
local held = {}
for i = 3, #ARGV, 2 do
  local stream, entry_id = KEYS[tonumber(ARGV[i])], ARGV[i + 1]
  local pending = redis.call('XPENDING', stream, ARGV[1], entry_id, entry_id, 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', stream, ARGV[1], ARGV[2], 0, entry_id, 'JUSTID')
    held[#held + 1] = (i - 1) / 2
  end
end
return held
"""

# KEYS: the band streams the entries are in
# ARGV: group, consumer, idle_ms, (key index, entry_id), ...
# Hands back the entries this consumer still holds, idle enough for the next reclaim to take
# them at once. The delivery count goes down by one: the next reclaim adds it back, so a
# replica stopping cleanly (or one without room for a reclaimed request) does not count
# against the request's max_deliveries.
_HAND_BACK = """
local handed = 0
for i = 4, #ARGV, 2 do
  local stream, entry_id = KEYS[tonumber(ARGV[i])], ARGV[i + 1]
  local pending = redis.call('XPENDING', stream, ARGV[1], entry_id, entry_id, 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', stream, ARGV[1], ARGV[2], 0, entry_id, 'IDLE', ARGV[3],
               'RETRYCOUNT', math.max(pending[1][4] - 1, 0), 'JUSTID')
    handed = handed + 1
  end
end
return handed
"""

# KEYS: band stream of each priority from the most urgent on
# ARGV: group, consumer, min_idle_ms, max_count, first priority
# Returns {{ticket, delivery_count, {field, value, ...}}, ...}, most urgent band first. The
# cursor loop matters: XAUTOCLAIM scans a bounded slice of the pending list per call, and
# expired entries may sit behind many live ones.
_RECLAIM = (
    _TICKET
    + """
local wanted = tonumber(ARGV[4])
local claimed = {}
for index, stream in ipairs(KEYS) do
  if #claimed >= wanted then
    break
  end
  if redis.call('EXISTS', stream) == 1 then
    local priority = tostring(tonumber(ARGV[5]) + index - 1)
    local cursor = '0-0'
    repeat
      local reply = redis.call('XAUTOCLAIM', stream, ARGV[1], ARGV[2], ARGV[3], cursor,
                               'COUNT', wanted - #claimed)
      cursor = reply[1]
      for _, entry in ipairs(reply[2]) do
        if entry then
          local pending = redis.call('XPENDING', stream, ARGV[1], entry[1], entry[1], 1)
          claimed[#claimed + 1] = {ticket_of(priority, entry[1]), pending[1][4], entry[2]}
        end
      end
    until cursor == '0-0' or #claimed >= wanted
  end
end
return claimed
"""
)

# KEYS: band stream, active, cancelled, dead, output
# ARGV: group, entry_id, request_id ('' when unreadable), output_ttl_ms, dead_max_len,
#       reason, deliveries, ticket, error-chunk field, value, ...
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
           'entry_id', ARGV[8], 'reason', ARGV[6], 'deliveries', ARGV[7], unpack(fields))
if ARGV[3] ~= '' and redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[8] then
  redis.call('XADD', KEYS[5], '*', unpack(ARGV, 9))
  redis.call('PEXPIRE', KEYS[5], ARGV[4])
end
return release(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[8], ARGV[3])
"""
)


class LuaScript(enum.Enum):
    ENQUEUE = _ENQUEUE
    CLAIM = _CLAIM
    FINISH = _FINISH
    CANCEL = _CANCEL
    RENEW = _RENEW
    RECLAIM = _RECLAIM
    HAND_BACK = _HAND_BACK
    DEAD_LETTER = _DEAD_LETTER
