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

local now = 0
local state_key, expiry_key = KEYS[1], KEYS[2]

local function fmt(x)
  return string.format('%.17g', x)
end

local function num(s)
  if s == nil or s == false or s == '' then return nil end
  return tonumber(s)
end

local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function same(a, b)  -- Python's ==, where nil/false both stand for None
  if a == nil then a = false end
  if b == nil then b = false end
  return a == b
end

local function is_finite(x)
  return x == x and x ~= math.huge and x ~= -math.huge
end

-- field -> stored state (table) or false (no such bucket); refreshed in place like
-- MemoryStore's dict entries.
local loaded = {}
local dirty, dirty_order = {}, {}
local names = {}  -- bucket field -> readable key (reserve only: written with a new bucket)

local function decode_state(raw)
  if not raw then return false end
  local l, u, p, s = cmsgpack.unpack(raw)
  return {l = l, u = u, p = p or nil, s = s}
end

-- One HMGET for every field of `fields` not loaded yet.
local function prefetch(fields)
  local want, seen = {}, {}
  for _, f in ipairs(fields) do
    if loaded[f] == nil and not seen[f] then
      seen[f] = true
      want[#want + 1] = f
    end
  end
  if #want == 0 then return end
  local v = redis.call('HMGET', state_key, unpack(want))
  for i, f in ipairs(want) do loaded[f] = decode_state(v[i]) end
end

local function load(field)
  local st = loaded[field]
  if st == nil then
    st = decode_state(redis.call('HGET', state_key, field))
    loaded[field] = st
  end
  return st
end

local function current_period(spec, t)
  if spec.ps == nil then return nil end
  if spec.pe ~= nil and t >= spec.pe then return spec.pe end
  return spec.ps
end

local function refresh(st, spec, t)
  local period = current_period(spec, t)
  if not st then
    return {l = spec.cap, u = t, p = period, s = 0, new = true}
  end
  if period ~= nil and (st.p == nil or period > st.p) then
    st.l = spec.cap
    st.p = period
    st.u = t
    return st
  end
  local elapsed = t - st.u
  if elapsed > 0 then
    if spec.rate > 0 and st.l < spec.cap then
      st.l = math.min(spec.cap, st.l + spec.rate * elapsed)
    end
    st.u = t
  end
  if st.l > spec.cap then st.l = spec.cap end
  return st
end

local function retry_after(st, spec, amount, t)
  local need = amount - st.l
  if need <= 0 then return 0 end
  if amount > spec.cap + 1e-9 then return nil end
  local best = nil
  if spec.rate > 0 then
    local w = need / spec.rate
    if is_finite(w) then best = w end
  end
  if spec.pe ~= nil and t < spec.pe then  -- past the end: the next end is unknown
    local w = math.max(spec.pe - t, 0)
    if best == nil or w < best then best = w end
  end
  return best
end

-- One phase = one "touched" dict of the Python code: get(field, spec) refreshes a bucket
-- once per phase and returns the same table for the same field.
local function new_phase()
  local touched, order = {}, {}
  local function get(field, spec)
    local st = touched[field]
    if st == nil then
      st = refresh(load(field), spec, now)
      touched[field] = st
      order[#order + 1] = field
    end
    return st
  end
  local function keep()  -- MemoryStore: self._buckets.update(touched)
    for _, field in ipairs(order) do
      loaded[field] = touched[field]
      if not dirty[field] then
        dirty[field] = true
        dirty_order[#dirty_order + 1] = field
      end
    end
  end
  return get, keep
end

-- One HSET: every bucket kept since the last flush, then the field/value pairs of `extra`.
local function flush(extra)
  local args = {}
  for _, field in ipairs(dirty_order) do
    local st = loaded[field]
    args[#args + 1] = field
    args[#args + 1] = cmsgpack.pack(st.l, st.u, st.p or false, st.s)
    if st.new then
      st.new = nil
      if names[field] then
        args[#args + 1] = 'k:' .. string.sub(field, 3)
        args[#args + 1] = names[field]
      end
    end
  end
  dirty, dirty_order = {}, {}
  if extra then
    for _, v in ipairs(extra) do args[#args + 1] = v end
  end
  if #args > 0 then redis.call('HSET', state_key, unpack(args)) end
end

local CHARGE_FIELDS = 14

local function encode_lease(nonce, meta, held)
  local v, n = {nonce, meta}, 2
  for _, h in ipairs(held) do
    local bs, ls = h.bs, h.ls
    v[n + 1], v[n + 2], v[n + 3], v[n + 4], v[n + 5] = h.b, bs.cap, bs.rate, bs.ps or false, bs.pe or false
    v[n + 6], v[n + 7], v[n + 8] = h.took, h.lent, h.p or false
    if ls ~= nil then
      v[n + 9], v[n + 10], v[n + 11], v[n + 12], v[n + 13] = h.l, ls.cap, ls.rate, ls.ps or false, ls.pe or false
      v[n + 14] = h.lp or false
    else
      v[n + 9], v[n + 10], v[n + 11], v[n + 12], v[n + 13], v[n + 14] = false, false, false, false, false, false
    end
    n = n + CHARGE_FIELDS
  end
  return cmsgpack.pack(unpack(v, 1, n))
end

local function decode_lease(raw)
  local v = {cmsgpack.unpack(raw)}
  local held = {}
  for o = 2, #v - 1, CHARGE_FIELDS do
    local h = {
      b = v[o + 1], bs = {cap = v[o + 2], rate = v[o + 3], ps = v[o + 4] or nil, pe = v[o + 5] or nil},
      took = v[o + 6], lent = v[o + 7], p = v[o + 8] or nil,
    }
    if v[o + 9] then
      h.l, h.lp = v[o + 9], v[o + 14] or nil
      h.ls = {cap = v[o + 10], rate = v[o + 11], ps = v[o + 12] or nil, pe = v[o + 13] or nil}
    end
    held[#held + 1] = h
  end
  return {nonce = v[1], meta = v[2], held = held}
end

-- Every bucket field a list of helds touches (to prefetch them in one HMGET).
local function held_fields(held, out)
  for _, h in ipairs(held) do
    out[#out + 1] = h.b
    if h.l ~= nil then out[#out + 1] = h.l end
  end
  return out
end

-- base.apply_settle; actuals == nil charges the reserved amounts (expiry).
local function settle_held(get, held, actuals)
  local finals = {}
  for i, h in ipairs(held) do
    local total = h.took + h.lent
    local final = total
    if actuals ~= nil then final = actuals[i] end
    local delta = final - total
    local st = get(h.b, h.bs)
    local lent_final = h.lent
    if delta < 0 then
      local refund = -delta
      local back = math.min(refund, h.lent)
      lent_final = h.lent - back
      if h.l ~= nil and back ~= 0 then
        local lst = get(h.l, h.ls)
        if same(lst.p, h.lp) then
          lst.l = math.min(h.ls.cap, lst.l + back)
        end
      end
      local rest = refund - back
      if rest ~= 0 and same(st.p, h.p) then
        st.l = math.min(h.bs.cap, st.l + rest)
      end
    elseif delta > 0 then
      st.l = st.l - delta
    end
    st.s = st.s + (final - lent_final)
    if h.l ~= nil and lent_final ~= 0 then
      local lst = get(h.l, h.ls)
      lst.s = lst.s + lent_final
    end
    finals[i] = final
  end
  return finals
end

local function join(values)
  local parts = {}
  for i, v in ipairs(values) do parts[i] = fmt(v) end
  return table.concat(parts, ',')
end

-- The earliest lease expiry, or nil when no lease is open.
local function earliest_expiry()
  local first = redis.call('ZRANGE', expiry_key, 0, 0, 'WITHSCORES')
  return first[2] and tonumber(first[2]) or nil
end

-- Settle every lease due by now at its reserved amount (at most `limit` per call: a crash
-- of many workers is swept over several calls). The buckets are kept for the next flush().
-- Returns {id, meta, amounts, ...}, the set of swept ids and the new earliest expiry.
local function sweep(limit)
  local ids = redis.call('ZRANGEBYSCORE', expiry_key, '-inf', now, 'LIMIT', 0, limit)
  local out, swept = {}, {}
  if #ids > 0 then
    local fields = {}
    for i, id in ipairs(ids) do fields[i] = 'r:' .. id end
    local raws = redis.call('HMGET', state_key, unpack(fields))
    local leases, buckets = {}, {}
    for i, raw in ipairs(raws) do
      if raw then
        leases[i] = decode_lease(raw)
        held_fields(leases[i].held, buckets)
      end
    end
    prefetch(buckets)
    local get, keep = new_phase()
    for i, id in ipairs(ids) do
      swept[id] = true
      local lease = leases[i]
      if lease then
        local finals = settle_held(get, lease.held, nil)
        out[#out + 1] = id
        out[#out + 1] = lease.meta
        out[#out + 1] = join(finals)
      end
    end
    keep()
    redis.call('HDEL', state_key, unpack(fields))
    redis.call('ZREM', expiry_key, unpack(ids))
  end
  return out, swept, earliest_expiry()
end

local SWEEP_LIMIT = 500
