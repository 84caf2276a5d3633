-- budgetguard: bucket arithmetic shared by every script (the store prepends this file).
-- It mirrors budgetguard/stores/base.py (refresh, retry_after, apply_reserve, apply_settle)
-- line for line; the contract suite checks that both agree.
--
-- Bucket hash fields: l = level, u = updated_at, p = period_start (absent: none),
-- s = spent, k = the readable bucket key (debugging only).
-- Lease (a field of the leases hash): cmsgpack of the flat values nonce, meta, then per
-- charge bucket key, capacity, refill, period_start, period_end, took, lent, period,
-- lender key, lender capacity, refill, period_start, period_end, lender period (false
-- stands for none; msgpack keeps doubles exact).
-- Numbers handed to redis.call are written by Redis with '%.17g' (exact); numbers in
-- replies go out through fmt() for the same reason (Lua's tostring keeps 14 digits).

local now = 0

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

-- key -> stored state (table) or false (no such bucket); refreshed in place like
-- MemoryStore's dict entries.
local loaded = {}
local dirty, dirty_order = {}, {}

local function load(key)
  local st = loaded[key]
  if st == nil then
    local v = redis.call('HMGET', key, 'l', 'u', 'p', 's')
    if v[1] then
      st = {l = tonumber(v[1]), u = tonumber(v[2]), p = num(v[3]), s = tonumber(v[4]) or 0}
    else
      st = false
    end
    loaded[key] = st
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

-- One phase = one "touched" dict of the Python code: get(key, spec) refreshes a bucket
-- once per phase and returns the same table for the same key.
local function new_phase()
  local touched, order = {}, {}
  local function get(key, spec)
    local st = touched[key]
    if st == nil then
      st = refresh(load(key), spec, now)
      touched[key] = st
      order[#order + 1] = key
    end
    return st
  end
  local function keep()  -- MemoryStore: self._buckets.update(touched)
    for _, key in ipairs(order) do
      loaded[key] = touched[key]
      if not dirty[key] then
        dirty[key] = true
        dirty_order[#dirty_order + 1] = key
      end
    end
  end
  return get, keep
end

local function write_dirty(names)
  for _, key in ipairs(dirty_order) do
    local st = loaded[key]
    if st.new and names and names[key] then
      st.new = nil
      if st.p ~= nil then
        redis.call('HSET', key, 'l', st.l, 'u', st.u, 's', st.s, 'p', st.p, 'k', names[key])
      else
        redis.call('HSET', key, 'l', st.l, 'u', st.u, 's', st.s, 'k', names[key])
      end
    elseif st.p ~= nil then
      redis.call('HSET', key, 'l', st.l, 'u', st.u, 's', st.s, 'p', st.p)
    else
      redis.call('HSET', key, 'l', st.l, 'u', st.u, 's', st.s)
    end
  end
  dirty, dirty_order = {}, {}
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

-- Settle every lease due by now at its reserved amount; returns {id, meta, amounts, ...}.
-- At most `limit` per call (a crash of many workers is swept over several calls).
local function sweep(leases_key, expiry_key, limit)
  local ids = redis.call('ZRANGEBYSCORE', expiry_key, '-inf', now, 'LIMIT', 0, limit)
  if #ids == 0 then return {} end
  local get, keep = new_phase()
  local out = {}
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', leases_key, id)
    if raw then
      local lease = decode_lease(raw)
      local finals = settle_held(get, lease.held, nil)
      out[#out + 1] = id
      out[#out + 1] = lease.meta
      out[#out + 1] = join(finals)
    end
  end
  keep()
  redis.call('HDEL', leases_key, unpack(ids))
  redis.call('ZREM', expiry_key, unpack(ids))
  return out
end

local SWEEP_LIMIT = 500
