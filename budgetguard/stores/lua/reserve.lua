-- budgetguard reserve: sweep due leases, then take every charge or none.
-- KEYS: state hash, expiry zset.
-- ARGV[1]: the request as a sequence of MessagePack values (false stands for none):
--   id, nonce, lease_seconds, meta, n,
--   n specs: bucket hex, readable key, capacity, refill, period_start, period_end,
--   per charge: spec index (1-based), amount, lender spec index or 0
-- Reply: 1 reserved, 3 replay of this very request (its reply was lost), 2 id already
--   open; or, when denied or when leases expired, a table
--   {status, charge index, available, retry_after, expired id, meta, amounts, ...}
--   with status 0 for a denial.
-- Calls in the common case: TIME, one HMGET (sweep bound, lease, buckets), one HSET
-- (buckets, lease, bound), one ZADD.
now = server_now()
local request = {cmsgpack.unpack(ARGV[1])}
local id, nonce, meta = request[1], request[2], request[4]
local expires_at = now + request[3]
local lease_field = 'r:' .. id

local specs, fields, o = {}, {'next', lease_field}, 5
for j = 1, request[5] do
  local field = 'b:' .. request[o + 1]
  specs[j] = {key = field, cap = request[o + 3], rate = request[o + 4], ps = request[o + 5] or nil, pe = request[o + 6] or nil}
  names[field] = request[o + 2]
  fields[j + 2] = field
  o = o + 6
end
local charges = {}
for i = 1, (#request - o) / 3 do
  local lj = request[o + 3]
  charges[i] = {bs = specs[request[o + 1]], amount = request[o + 2], ls = lj > 0 and specs[lj] or nil}
  o = o + 3
end

local v = redis.call('HMGET', state_key, unpack(fields))
for j = 3, #fields do
  if loaded[fields[j]] == nil then loaded[fields[j]] = decode_state(v[j]) end
end
local stored_next = tonumber(v[1])
local next_expiry, open = stored_next, v[2]

-- MemoryStore sweeps only once the earliest expiry has passed; so do we.
local expired = {}
if next_expiry == nil or now >= next_expiry then
  local swept
  expired, swept, next_expiry = sweep(SWEEP_LIMIT)
  if swept[id] then open = false end  -- an expired lease with this id was just settled
end

local function reply(head)
  if #expired == 0 and head[1] ~= 0 then return head[1] end  -- the common case: one integer
  for _, x in ipairs(expired) do head[#head + 1] = x end
  return head
end

-- Writes what the sweep changed (and its new bound) when this request changes nothing.
local function flush_sweep()
  if next_expiry ~= nil and next_expiry ~= stored_next then
    flush({'next', next_expiry})
  else
    flush(nil)
  end
end

if open then
  flush_sweep()
  if decode_lease(open).nonce == nonce then return reply({3, 0, '', ''}) end
  return reply({2, 0, '', ''})
end

-- base.apply_reserve
local get, keep = new_phase()
local planned, held = {}, {}
for i, c in ipairs(charges) do
  local bkey = c.bs.key
  local st = get(bkey, c.bs)
  local avail = math.max(st.l - (planned[bkey] or 0), 0)
  local took, lent = c.amount, 0
  local lst = nil
  if avail < c.amount then
    local short = c.amount - avail
    local lavail = 0
    if c.ls ~= nil then
      lst = get(c.ls.key, c.ls)
      lavail = math.max(lst.l - (planned[c.ls.key] or 0), 0)
    end
    if lavail < short then
      local wait = retry_after(st, c.bs, c.amount, now)
      if c.ls ~= nil and lst ~= nil then
        local lwait = retry_after(lst, c.ls, short, now)
        if wait == nil or (lwait ~= nil and lwait < wait) then wait = lwait end
      end
      flush_sweep()  -- the sweep's changes stay; this request changes nothing
      return reply({0, i - 1, fmt(avail + lavail), wait and fmt(wait) or ''})
    end
    took, lent = avail, short
  end
  planned[bkey] = (planned[bkey] or 0) + took
  local h = {b = bkey, bs = c.bs, took = took, lent = lent, p = st.p}
  if lent ~= 0 then
    planned[c.ls.key] = (planned[c.ls.key] or 0) + lent
    h.l, h.ls, h.lp = c.ls.key, c.ls, lst.p
  end
  held[i] = h
end

for _, h in ipairs(held) do
  local st = get(h.b, h.bs)
  st.l = st.l - h.took
  if h.l ~= nil then
    local lst = get(h.l, h.ls)
    lst.l = lst.l - h.lent
  end
end
keep()
local extra = {lease_field, encode_lease(nonce, meta, held)}
if next_expiry == nil or expires_at < next_expiry then next_expiry = expires_at end
if next_expiry ~= stored_next then
  extra[3], extra[4] = 'next', next_expiry
end
flush(extra)
redis.call('ZADD', expiry_key, expires_at, id)
return reply({1, 0, '', ''})
