-- budgetguard: bucket arithmetic shared by every script (the store prepends this file).
-- It mirrors budgetguard/stores/base.py (refresh, retry_after, full_after, apply_reserve,
-- apply_settle) and budgetguard/periods.py (PeriodRule.bounds) line for line; the contract
-- suite checks that both agree. Every time is the server's (TIME): clients send period rules, not bounds.
--
-- KEYS[1], the state hash, holds every bucket and every open lease of a namespace, so a
-- script reads all it needs with one HMGET and writes it back with one HSET:
--   b:<hex>  a bucket (hex = sha256 of its key): cmsgpack of level, updated_at,
--            period_start (false: none), spent, holds (open leases holding it; absent in
--            buckets written before it was kept: 0)
--   k:<hex>  the bucket's readable key (written once, for debugging)
--   r:<id>   an open lease: cmsgpack of the flat values nonce, meta, the lease format (2),
--            then per charge bucket field, capacity, refill, period rule, took, lent,
--            period, lender field, lender capacity, refill, period rule, lender period
--            (false stands for none; msgpack keeps doubles exact). Format 1 (budgetguard
--            before period rules: no format value, period bounds instead of rules) is
--            read as format 2 without rules.
--   next     a lower bound of the earliest lease expiry (absent: unknown). Reserve only
--            probes the expiry zset once the server clock reaches it.
--   j:<id>   a journal entry: a lease swept and not yet acknowledged (cmsgpack of its meta
--            and its charged amounts, the reply's text)
--   journal  how many entries the journal holds (absent: none). Reserve reads it with its
--            one HMGET, so an empty journal costs nothing.
-- KEYS[2], the expiry zset: reservation id by lease expiry (server time).
-- KEYS[3], the full zset: bucket hex by the server time at which the bucket, as last
--   written, is full again (written only for buckets no lease holds). A bucket that is
--   full and unheld grants what a new one grants, so forget() deletes it once its time
--   has come (any write since would have moved or dropped its time; a hold is checked).
-- KEYS[4], the journal zset: swept reservation id by when it was swept (server time). A
--   sweep moves each lease it charges into the journal; reserve and sweep report the
--   oldest entries until acknowledge.lua drops them (see base.py: the journal).
-- Numbers handed to redis.call are written by Redis with '%.17g' (exact); numbers in
-- replies go out through fmt() for the same reason (Lua's tostring keeps 14 digits).
--
-- Written for speed (every script runs this chunk, and Redis runs one script at a time):
-- a bucket is a table {level, updated_at, period (false: none), spent, holds, new (true:
-- not stored yet), capacity, refill, rule (its spec, as last touched)}; a lease stays the
-- flat array cmsgpack.unpack gives (charge i at offset 3 + 12 * (i - 1)); specs travel as
-- capacity, refill and period rule (a table {unit, offset, change time, offset, ...} or
-- false), and periods are always a number or false, so Python's None == None is Lua's
-- false == false.

local now = 0
local state_key, expiry_key, full_key, journal_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local tonumber, unpack, pack, mmin, floor = tonumber, unpack, cmsgpack.pack, math.min, math.floor
local huge = math.huge

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
  local l, u, p, s, h = cmsgpack.unpack(raw)
  return {l, u, p, s, h or 0}
end

-- periods.PeriodRule.bounds: rule = {unit, offset, change time, offset, ...}.
local DAY = 86400
local FIXED = {minute = 60, hour = 3600, day = DAY}

local function offset_at(rule, t)
  local offset = rule[2]
  for i = 3, #rule - 1, 2 do
    if t < rule[i] then break end
    offset = rule[i + 1]
  end
  return offset
end

local function to_utc(rule, wall)
  local offset = rule[2]
  for i = 3, #rule - 1, 2 do
    local after = rule[i + 1]
    if wall < rule[i] + math.max(offset, after) then break end
    offset = after
  end
  return wall - offset
end

local function civil_from_days(days)
  local z = days + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local day = doy - floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  return yoe + era * 400 + (month <= 2 and 1 or 0), month, day
end

local function days_from_civil(year, month, day)
  local y = month <= 2 and year - 1 or year
  local era = floor(y / 400)
  local yoe = y - era * 400
  local doy = floor((153 * (month > 2 and month - 3 or month + 9) + 2) / 5) + day - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function local_start(unit, wall)
  local size = FIXED[unit]
  if size then return floor(wall / size) * size end
  local days = floor(wall / DAY)
  if unit == 'week' then return (days - (days + 3) % 7) * DAY end
  local _, _, day = civil_from_days(days)
  return (days - day + 1) * DAY
end

local function local_next(unit, start)
  local size = FIXED[unit]
  if size then return start + size end
  if unit == 'week' then return start + 7 * DAY end
  local year, month = civil_from_days(floor(start / DAY))
  if month == 12 then year, month = year + 1, 1 else month = month + 1 end
  return days_from_civil(year, month, 1) * DAY
end

local function period_bounds(rule, t)
  local first = local_start(rule[1], t + offset_at(rule, t))
  return to_utc(rule, first), to_utc(rule, local_next(rule[1], first))
end

-- base.refresh; a new bucket is marked [6] = true (flush() then writes its readable key).
local function refresh(st, cap, rate, rule, t)
  local period = false
  if rule then period = period_bounds(rule, t) end
  if not st then
    return {cap, t, period, 0, 0, true}
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

-- base.retry_after. sources: {state, capacity, refill, rule, planned} per bucket a charge
-- draws on (its own, then its lender's).
local function retry_after(sources, amount, t)
  local ends, changes = {}, {}
  local function change(x)
    if x > 0 and x < huge then changes[#changes + 1] = x end
  end
  for i, s in ipairs(sources) do
    local e = huge
    if s[4] then
      local _, period_end = period_bounds(s[4], t)
      e = period_end - t
    end
    if not (e > 0) then e = huge end
    ends[i] = e
    change(e)
    if s[3] > 0 then
      change((s[5] - s[1][1]) / s[3])
      change((s[2] - s[1][1]) / s[3])
    end
  end
  table.sort(changes)
  changes[#changes + 1] = huge
  local function level(i, at)
    local s = sources[i]
    if at >= ends[i] then return s[2] end
    return mmin(s[2], s[1][1] + s[3] * at)
  end
  local at = 0
  for _, upto in ipairs(changes) do
    local covered = 0
    for i, s in ipairs(sources) do covered = covered + math.max(level(i, at) - s[5], 0) end
    if covered >= amount then return at end
    local middle = upto == huge and at + 1 or (at + upto) / 2
    local slope = 0
    for i, s in ipairs(sources) do
      local l = level(i, middle)
      if s[3] > 0 and s[5] < l and l < s[2] then slope = slope + s[3] end
    end
    if slope > 0 and at + (amount - covered) / slope <= upto then
      return at + (amount - covered) / slope
    end
    at = upto
  end
  return nil
end

-- base.full_after: seconds until the refreshed bucket st is full again by itself, or nil.
local function full_after(st, cap, rate, rule)
  if st[1] >= cap then return 0 end
  local wait = huge
  if rate > 0 then wait = (cap - st[1]) / rate end
  if rule then
    local _, period_end = period_bounds(rule, now)
    local e = period_end - now
    if e > 0 and e < wait then wait = e end
  end
  if wait == huge then return nil end
  return wait
end

-- The bucket in `field` brought up to now (loaded once per script, with an HGET if no
-- HMGET fetched it). Refreshing again at the same now changes nothing (MemoryStore's
-- getter relies on that too), so every charge on one bucket sees the same table.
local function touch(field, cap, rate, rule)
  local st = loaded[field]
  if st == nil then
    st = decode_state(redis.call('HGET', state_key, field))
  end
  st = refresh(st, cap, rate, rule, now)
  st[7], st[8], st[9] = cap, rate, rule
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
-- from `names`, when given), then up to two more field/value pairs. Then one ZADD: when
-- each marked bucket that no lease holds is full again (never, without refill or period).
local function flush(names, f1, v1, f2, v2)
  local args, n = {}, 0
  local full, m = {}, 0
  for _, field in ipairs(dirty_order) do
    local st = loaded[field]
    args[n + 1], args[n + 2] = field, pack(st[1], st[2], st[3], st[4], st[5])
    n = n + 2
    if st[6] then
      st[6] = nil
      if names and names[field] then
        args[n + 1], args[n + 2] = 'k:' .. string.sub(field, 3), names[field]
        n = n + 2
      end
    end
    if st[5] == 0 then
      local wait = full_after(st, st[7], st[8], st[9])
      if wait then
        full[m + 1], full[m + 2] = now + wait, string.sub(field, 3)
        m = m + 2
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
  if m > 0 then redis.call('ZADD', full_key, unpack(full, 1, m)) end
end

-- Forget up to `limit` buckets whose full time has come and that no lease holds: delete
-- the bucket and its readable key (a bucket is made again, full, when next used). Runs
-- after flush(), so this script's own writes are in the hash and the zset.
local function forget(limit)
  local due = redis.call('ZRANGEBYSCORE', full_key, '-inf', now, 'LIMIT', 0, limit)
  if #due == 0 then return end
  local fields = {}
  for i, hex in ipairs(due) do fields[i] = 'b:' .. hex end
  local raws = redis.call('HMGET', state_key, unpack(fields))
  local gone, g = {}, 0
  for i, hex in ipairs(due) do
    local st = decode_state(raws[i])
    if st and st[5] <= 0 then  -- held: the settle that releases it schedules it again
      gone[g + 1], gone[g + 2] = fields[i], 'k:' .. hex
      g = g + 2
      loaded[fields[i]] = false
    end
  end
  redis.call('ZREM', full_key, unpack(due))
  if g > 0 then redis.call('HDEL', state_key, unpack(gone, 1, g)) end
end

-- Buckets each settle forgets at most (a call makes a bucket per new scope it uses, so
-- this keeps up; a sweep forgets more).
local FORGET_PER_SETTLE = 8
local FORGET_PER_SWEEP = 1000

local CHARGE_FIELDS = 12
local LEASE_HEAD = 3  -- nonce, meta, format

-- A lease's flat values (format 2; a format-1 lease is converted, its specs without rules).
local function decode_lease(raw)
  local v = {cmsgpack.unpack(raw)}
  if type(v[3]) == 'number' then return v end
  local out, n = {v[1], v[2], 2}, LEASE_HEAD
  for o = 2, #v - 1, 14 do
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = v[o + 1], v[o + 2], v[o + 3], false
    out[n + 5], out[n + 6], out[n + 7] = v[o + 6], v[o + 7], v[o + 8]
    out[n + 8], out[n + 9], out[n + 10], out[n + 11], out[n + 12] = v[o + 9], v[o + 10], v[o + 11], false, v[o + 14]
    n = n + CHARGE_FIELDS
  end
  return out
end

-- One HMGET for every bucket a lease (flat values) touches that is not loaded yet.
local function prefetch(v, want, seen)
  for o = LEASE_HEAD, #v - 1, CHARGE_FIELDS do
    local b, l = v[o + 1], v[o + 8]
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
  for o = LEASE_HEAD, #v - 1, CHARGE_FIELDS do
    i = i + 1
    local cap, took, lent, lf = v[o + 2], v[o + 5], v[o + 6], v[o + 8]
    local total = took + lent
    local final = total
    if actuals ~= nil then final = actuals[first + i - 1] end
    local delta = final - total
    local st = touch(v[o + 1], cap, v[o + 3], v[o + 4])
    mark(v[o + 1])
    st[5] = math.max(st[5] - 1, 0)  -- this lease no longer holds it
    local lent_final = lent
    if lf then  -- it lent: this lease held the lender too
      local lst = touch(lf, v[o + 9], v[o + 10], v[o + 11])
      mark(lf)
      lst[5] = math.max(lst[5] - 1, 0)
    end
    if delta < 0 then
      local refund = -delta
      local back = mmin(refund, lent)
      lent_final = lent - back
      if lf and back ~= 0 then
        local lst = touch(lf, v[o + 9], v[o + 10], v[o + 11])
        mark(lf)
        if lst[3] == v[o + 12] then
          lst[1] = mmin(v[o + 9], lst[1] + back)
        end
      end
      local rest = refund - back
      if rest ~= 0 and st[3] == v[o + 7] then
        st[1] = mmin(cap, st[1] + rest)
      end
    elseif delta > 0 then
      st[1] = st[1] - delta
    end
    st[4] = st[4] + (final - lent_final)
    if lf and lent_final ~= 0 then
      local lst = touch(lf, v[o + 9], v[o + 10], v[o + 11])
      mark(lf)
      lst[4] = lst[4] + lent_final
    end
    finals[i] = final
  end
  return finals
end
