-- budgetguard: bucket arithmetic shared by every script (the store prepends this file).
-- It mirrors budgetguard/stores/base.py (refresh, retry_after, apply_reserve, apply_settle)
-- line for line; the contract suite checks that both agree.
--
-- KEYS[1], the state hash, holds every bucket and every open lease of a namespace, so a
-- script reads all it needs with one HMGET and writes it back with one HSET:
--   b:<hex>  a bucket (hex = sha256 of its key): cmsgpack of level, updated_at,
--            period_start (false: none), spent
--   k:<hex>  the bucket's readable key (written once, for debugging)
--   r:<id>   an open lease: cmsgpack of the flat values nonce, meta, then per charge
--            bucket field, capacity, refill, period_start, period_end, took, lent,
--            period, lender field, lender capacity, refill, period_start, period_end,
--            lender period (false stands for none; msgpack keeps doubles exact)
--   next     a lower bound of the earliest lease expiry (absent: unknown). Reserve only
--            probes the expiry zset once the server clock reaches it.
-- KEYS[2], the expiry zset: reservation id by lease expiry (server time).
-- Numbers handed to redis.call are written by Redis with '%.17g' (exact); numbers in
-- replies go out through fmt() for the same reason (Lua's tostring keeps 14 digits).
--
-- Written for speed (every script runs this chunk, and Redis runs one script at a time):
-- a bucket is a table {level, updated_at, period (false: none), spent}; a lease stays the
-- flat array cmsgpack.unpack gives (charge i at offset 2 + 14 * (i - 1)); specs travel as
-- their four numbers (capacity, refill, period_start, period_end; false for none) and
-- periods are always a number or false, so Python's None == None is Lua's false == false.

local now = 0
local state_key, expiry_key = KEYS[1], KEYS[2]
local tonumber, unpack, pack, mmin = tonumber, unpack, cmsgpack.pack, math.min

local function fmt(x)
  return string.format('%.17g', x)
end

local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- field -> stored bucket (table) or false (no such bucket), shared by the phases of a
-- script; dirty buckets are written by flush().
local loaded = {}
local dirty, dirty_order = {}, {}

local function decode_state(raw)
  if not raw then return false end
  local l, u, p, s = cmsgpack.unpack(raw)
  return {l, u, p, s}
end

-- base.refresh; a new bucket is marked [5] = true (flush() then writes its readable key).
local function refresh(st, cap, rate, ps, pe, t)
  local period = ps
  if ps and pe and t >= pe then period = pe end
  if not st then
    return {cap, t, period, 0, true}
  end
  if period and (not st[3] or period > st[3]) then
    st[1], st[3], st[2] = cap, period, t
    return st
  end
  local elapsed = t - st[2]
  if elapsed > 0 then
    if rate > 0 and st[1] < cap then
      st[1] = mmin(cap, st[1] + rate * elapsed)
    end
    st[2] = t
  end
  if st[1] > cap then st[1] = cap end
  return st
end

-- base.retry_after
local function retry_after(st, cap, rate, pe, amount, t)
  local function is_finite(x)
    return x == x and x ~= math.huge and x ~= -math.huge
  end
  local need = amount - st[1]
  if need <= 0 then return 0 end
  if amount > cap + 1e-9 then return nil end
  local best = nil
  if rate > 0 then
    local w = need / rate
    if is_finite(w) then best = w end
  end
  if pe and t < pe then  -- past the end: the next end is unknown
    local w = math.max(pe - t, 0)
    if best == nil or w < best then best = w end
  end
  return best
end

-- The bucket in `field` brought up to now (loaded once per script, with an HGET if no
-- HMGET fetched it). Refreshing again at the same now changes nothing (MemoryStore's
-- getter relies on that too), so every charge on one bucket sees the same table.
local function touch(field, cap, rate, ps, pe)
  local st = loaded[field]
  if st == nil then
    st = decode_state(redis.call('HGET', state_key, field))
  end
  st = refresh(st, cap, rate, ps, pe, now)
  loaded[field] = st
  return st
end

-- The bucket in `field` is written by the next flush().
local function mark(field)
  if not dirty[field] then
    dirty[field] = true
    dirty_order[#dirty_order + 1] = field
  end
end

-- One HSET (the script's only one): every marked bucket (a new one with its readable key
-- from `names`, when given), then up to two more field/value pairs.
local function flush(names, f1, v1, f2, v2)
  local args, n = {}, 0
  for _, field in ipairs(dirty_order) do
    local st = loaded[field]
    args[n + 1], args[n + 2] = field, pack(st[1], st[2], st[3], st[4])
    n = n + 2
    if st[5] then
      st[5] = nil
      if names and names[field] then
        args[n + 1], args[n + 2] = 'k:' .. string.sub(field, 3), names[field]
        n = n + 2
      end
    end
  end
  if f1 then
    args[n + 1], args[n + 2] = f1, v1
    n = n + 2
  end
  if f2 then
    args[n + 1], args[n + 2] = f2, v2
    n = n + 2
  end
  if n > 0 then redis.call('HSET', state_key, unpack(args, 1, n)) end
end

local CHARGE_FIELDS = 14

-- One HMGET for every bucket a lease (flat values) touches that is not loaded yet.
local function prefetch(v, want, seen)
  for o = 2, #v - 1, CHARGE_FIELDS do
    local b, l = v[o + 1], v[o + 9]
    if loaded[b] == nil and not seen[b] then
      seen[b] = true
      want[#want + 1] = b
    end
    if l and loaded[l] == nil and not seen[l] then
      seen[l] = true
      want[#want + 1] = l
    end
  end
  return want
end

local function load_fields(want)
  if #want == 0 then return end
  local got = redis.call('HMGET', state_key, unpack(want))
  for i, f in ipairs(want) do loaded[f] = decode_state(got[i]) end
end

-- base.apply_settle on a lease's flat values; actuals == nil charges the reserved
-- amounts (expiry), else actuals[first + i - 1] is charge i's amount. Returns the finals.
local function settle_lease(v, actuals, first)
  local finals = {}
  local i = 0
  for o = 2, #v - 1, CHARGE_FIELDS do
    i = i + 1
    local cap, took, lent, lf = v[o + 2], v[o + 6], v[o + 7], v[o + 9]
    local total = took + lent
    local final = total
    if actuals ~= nil then final = actuals[first + i - 1] end
    local delta = final - total
    local st = touch(v[o + 1], cap, v[o + 3], v[o + 4], v[o + 5])
    mark(v[o + 1])
    local lent_final = lent
    if delta < 0 then
      local refund = -delta
      local back = mmin(refund, lent)
      lent_final = lent - back
      if lf and back ~= 0 then
        local lst = touch(lf, v[o + 10], v[o + 11], v[o + 12], v[o + 13])
        mark(lf)
        if lst[3] == v[o + 14] then
          lst[1] = mmin(v[o + 10], lst[1] + back)
        end
      end
      local rest = refund - back
      if rest ~= 0 and st[3] == v[o + 8] then
        st[1] = mmin(cap, st[1] + rest)
      end
    elseif delta > 0 then
      st[1] = st[1] - delta
    end
    st[4] = st[4] + (final - lent_final)
    if lf and lent_final ~= 0 then
      local lst = touch(lf, v[o + 10], v[o + 11], v[o + 12], v[o + 13])
      mark(lf)
      lst[4] = lst[4] + lent_final
    end
    finals[i] = final
  end
  return finals
end

-- Settle every lease due by now at its reserved amount (at most `limit` per call: a crash
-- of many workers is swept over several calls). The buckets are kept for the next flush().
-- Returns {id, meta, amounts, ...}, the set of swept ids and the new earliest expiry.
local function sweep(limit)
  local function join(values)
    local parts = {}
    for i, x in ipairs(values) do parts[i] = fmt(x) end
    return table.concat(parts, ',')
  end
  local ids = redis.call('ZRANGEBYSCORE', expiry_key, '-inf', now, 'LIMIT', 0, limit)
  local out, swept = {}, {}
  if #ids > 0 then
    local fields = {}
    for i, id in ipairs(ids) do fields[i] = 'r:' .. id end
    local raws = redis.call('HMGET', state_key, unpack(fields))
    local leases, want, seen = {}, {}, {}
    for i, raw in ipairs(raws) do
      if raw then
        leases[i] = {cmsgpack.unpack(raw)}
        prefetch(leases[i], want, seen)
      end
    end
    load_fields(want)
    for i, id in ipairs(ids) do
      swept[id] = true
      local lease = leases[i]
      if lease then
        local finals = settle_lease(lease, nil, 1)
        out[#out + 1] = id
        out[#out + 1] = lease[2]
        out[#out + 1] = join(finals)
      end
    end
    redis.call('HDEL', state_key, unpack(fields))
    redis.call('ZREM', expiry_key, unpack(ids))
  end
  local first = redis.call('ZRANGE', expiry_key, 0, 0, 'WITHSCORES')  -- the new earliest expiry
  return out, swept, first[2] and tonumber(first[2]) or nil
end

local SWEEP_LIMIT = 500
