-- budgetguard reserve: sweep due leases, then take every charge or none.
-- KEYS: leases hash, expiry zset, then one bucket key per spec (a key may repeat).
-- ARGV[1]: the request as JSON (decoded in C by cjson; false stands for none):
--   [id, nonce, lease_seconds, meta,
--    [[readable key, capacity, refill, period_start, period_end], ...],   spec j <-> KEYS[2 + j]
--    [spec index, amount, lender spec index or 0, ...]]                  (1-based)
-- Reply: 1 reserved, 3 replay of this very request (its reply was lost), 2 id already
--   open; or, when denied or when leases expired, a table
--   {status, charge index, available, retry_after, expired id, meta, amounts, ...}
--   with status 0 for a denial.
now = server_now()
local leases_key, expiry_key = KEYS[1], KEYS[2]
local request = cjson.decode(ARGV[1])
local id, nonce, meta = request[1], request[2], request[4]
local expires_at = now + request[3]

local specs, names = {}, {}
for j, s in ipairs(request[5]) do
  local key = KEYS[2 + j]
  specs[j] = {key = key, cap = s[2], rate = s[3], ps = s[4] or nil, pe = s[5] or nil}
  names[key] = s[1]
end
local charges, flat = {}, request[6]
for i = 1, #flat / 3 do
  local o = (i - 1) * 3
  local lj = flat[o + 3]
  charges[i] = {bs = specs[flat[o + 1]], amount = flat[o + 2], ls = lj > 0 and specs[lj] or nil}
end

local expired = sweep(leases_key, expiry_key, SWEEP_LIMIT)

local function reply(head)
  if #expired == 0 and head[1] ~= 0 then return head[1] end  -- the common case: one integer
  for _, v in ipairs(expired) do head[#head + 1] = v end
  return head
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
      write_dirty(nil)  -- the sweep's changes stay; this request changes nothing
      if redis.call('HEXISTS', leases_key, id) == 1 then return reply({2, 0, '', ''}) end
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

if redis.call('HSETNX', leases_key, id, encode_lease(nonce, meta, held)) == 0 then
  write_dirty(nil)
  local lease = decode_lease(redis.call('HGET', leases_key, id))
  if lease.nonce == nonce then return reply({3, 0, '', ''}) end
  return reply({2, 0, '', ''})
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
write_dirty(names)
redis.call('ZADD', expiry_key, expires_at, id)
return reply({1, 0, '', ''})
