-- budgetguard: sweeping expired leases into the journal, and reporting the journal. The
-- store puts this file after lib.lua in the scripts that sweep or report (reserve, sweep,
-- acknowledge) and only there: every function a chunk defines costs each call of its
-- script a closure (a few thousand server instructions for these), and settle and
-- snapshot never sweep.

-- The journal's size into the state hash's `journal` field (absent when empty).
local function count_journal()
  local size = redis.call('ZCARD', journal_key)
  if size > 0 then
    redis.call('HSET', state_key, 'journal', size)
  else
    redis.call('HDEL', state_key, 'journal')
  end
  return size
end

-- base.JOURNAL_REPORT: journal entries one reserve or sweep reports at most.
local JOURNAL_REPORT = 100

-- The journal's oldest entries (at most JOURNAL_REPORT): {id, meta, amounts, ...}.
local function report()
  local ids = redis.call('ZRANGE', journal_key, 0, JOURNAL_REPORT - 1)
  local out = {}
  if #ids == 0 then return out end
  local fields = {}
  for i, id in ipairs(ids) do fields[i] = 'j:' .. id end
  local raws = redis.call('HMGET', state_key, unpack(fields))
  for i, id in ipairs(ids) do
    if raws[i] then
      local meta, amounts = cmsgpack.unpack(raws[i])
      out[#out + 1], out[#out + 2], out[#out + 3] = id, meta, amounts
    end
  end
  return out
end

-- Settle every lease due by now at its reserved amount into the journal (at most `limit`
-- per call: a crash of many workers is swept over several calls). The buckets are kept for
-- the next flush(); the journal is written here. Returns the set of swept ids, the new
-- earliest expiry and the journal's new size (nil: unchanged).
local function sweep(limit)
  local function join(values)
    local parts = {}
    for i, x in ipairs(values) do parts[i] = fmt(x) end
    return table.concat(parts, ',')
  end
  local ids = redis.call('ZRANGEBYSCORE', expiry_key, '-inf', now, 'LIMIT', 0, limit)
  local swept, size = {}, nil
  if #ids > 0 then
    local fields = {}
    for i, id in ipairs(ids) do fields[i] = 'r:' .. id end
    local raws = redis.call('HMGET', state_key, unpack(fields))
    local leases, want, seen = {}, {}, {}
    for i, raw in ipairs(raws) do
      if raw then
        leases[i] = decode_lease(raw)
        prefetch(leases[i], want, seen)
      end
    end
    load_fields(want)
    local entries, members, n = {}, {}, 0
    for i, id in ipairs(ids) do
      swept[id] = true
      local lease = leases[i]
      if lease then
        local finals = settle_lease(lease, nil, 1)
        entries[n + 1], entries[n + 2] = 'j:' .. id, pack(lease[2], join(finals))
        members[n + 1], members[n + 2] = now, id
        n = n + 2
      end
    end
    redis.call('HDEL', state_key, unpack(fields))
    redis.call('ZREM', expiry_key, unpack(ids))
    if n > 0 then
      redis.call('HSET', state_key, unpack(entries, 1, n))
      redis.call('ZADD', journal_key, unpack(members, 1, n))
      size = count_journal()
    end
  end
  local first = redis.call('ZRANGE', expiry_key, 0, 0, 'WITHSCORES')  -- the new earliest expiry
  return swept, first[2] and tonumber(first[2]) or nil, size
end

local SWEEP_LIMIT = 500
