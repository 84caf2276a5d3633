-- budgetguard reserve: sweep due leases, then take every charge or none.
-- KEYS: state hash, expiry zset, full zset, journal zset.
-- ARGV[1]: the request as a sequence of MessagePack values (false stands for none):
--   id, nonce, lease_seconds, meta, n,
--   n specs: bucket hex, readable key, capacity, refill, period rule,
--   per charge: spec index (1-based), amount, lender spec index or 0
-- Reply: 1 reserved, 3 replay of this very request (its reply was lost), 2 id already
--   open; or, when denied or when leases expired, a table
--   {status, charge index, available, retry_after, expired id, meta, amounts, ...}
--   with status 0 for a denial; the expired entries are the journal's (lib.lua report()),
--   sent whenever the journal is not empty.
-- Calls in the common case: TIME, one HMGET (sweep bound, journal size, lease, buckets),
-- one HSET (buckets, lease, bound), one ZADD.
now = server_now()
local r = {cmsgpack.unpack(ARGV[1])}
local id = r[1]
local nspec = r[5]
local lease_field = 'r:' .. id

-- Spec j: r[s + 1] hex .. r[s + 5] period rule with s = 5 * j; its field is fields[j + 3].
local fields = {'next', 'journal', lease_field}
for j = 1, nspec do fields[j + 3] = 'b:' .. r[5 * j + 1] end

local v = redis.call('HMGET', state_key, unpack(fields))
local names = nil  -- field -> readable key of each bucket not stored yet
for j = 1, nspec do
  local f, raw = fields[j + 3], v[j + 3]
  if raw then
    loaded[f] = decode_state(raw)
  else
    loaded[f] = false
    names = names or {}
    names[f] = r[5 * j + 2]
  end
end
local stored_next = tonumber(v[1])
local next_expiry, journal, open = stored_next, tonumber(v[2]) or 0, v[3]

-- MemoryStore sweeps only once the earliest expiry has passed; so do we.
if next_expiry == nil or now >= next_expiry then
  local swept, size
  swept, next_expiry, size = sweep(SWEEP_LIMIT)
  if swept[id] then open = false end  -- an expired lease with this id was just settled
  journal = size or journal
end
local expired = nil  -- the journal's entries, reported until acknowledged
if journal > 0 then
  expired = report()
  if #expired == 0 then  -- a stale size (a hand edit): set it right
    expired = nil
    count_journal()
  end
end

-- Ends a request that changes nothing: writes what the sweep changed (and its new bound);
-- the reply is the status alone, or {status, index, available, retry_after, expired...}.
local function finish(status, index, avail, wait)
  if next_expiry ~= nil and next_expiry ~= stored_next then
    flush(nil, 'next', next_expiry)
  else
    flush(nil)
  end
  if not expired and status ~= 0 then return status end
  local out = {status, index, avail, wait}
  for _, x in ipairs(expired or {}) do out[#out + 1] = x end
  return out
end

if open then
  if cmsgpack.unpack(open) == r[2] then return finish(3, 0, '', '') end  -- the lease's nonce
  return finish(2, 0, '', '')
end

-- base.apply_reserve. Charge i: spec index r[c + 1], amount r[c + 2], lender index r[c + 3]
-- with c = 5 * nspec + 2 + 3 * i; planned[field] is what this request took so far.
local planned = {}
local lease, n = {r[2], r[4], 2}, LEASE_HEAD
local c = 5 * nspec + 2
for i = 1, (#r - 5 - 5 * nspec) / 3 do
  c = c + 3
  local j, amount, lj = r[c + 1], r[c + 2], r[c + 3]
  local s = 5 * j
  local cap, rate, rule = r[s + 3], r[s + 4], r[s + 5]
  local bf = fields[j + 3]
  local st = touch(bf, cap, rate, rule)
  local avail = math.max(st[1] - (planned[bf] or 0), 0)
  local took, lent = amount, 0
  local lst, lf, l = nil, nil, 5 * lj
  if avail < amount then
    local short = amount - avail
    local lavail = 0
    if lj > 0 then
      lf = fields[lj + 3]
      lst = touch(lf, r[l + 3], r[l + 4], r[l + 5])
      lavail = math.max(lst[1] - (planned[lf] or 0), 0)
    end
    if lavail < short then
      local sources = {{st, cap, rate, rule, planned[bf] or 0}}
      if lst ~= nil then sources[2] = {lst, r[l + 3], r[l + 4], r[l + 5], planned[lf] or 0} end
      local wait = retry_after(sources, amount, now)
      return finish(0, i - 1, fmt(avail + lavail), wait and fmt(wait) or '')  -- the sweep's changes stay
    end
    took, lent = avail, short
  end
  planned[bf] = (planned[bf] or 0) + took
  lease[n + 1], lease[n + 2], lease[n + 3], lease[n + 4] = bf, cap, rate, rule
  lease[n + 5], lease[n + 6], lease[n + 7] = took, lent, st[3]
  if lent ~= 0 then
    planned[lf] = (planned[lf] or 0) + lent
    lease[n + 8], lease[n + 9], lease[n + 10], lease[n + 11], lease[n + 12] = lf, r[l + 3], r[l + 4], r[l + 5], lst[3]
  else
    lease[n + 8], lease[n + 9], lease[n + 10], lease[n + 11], lease[n + 12] = false, false, false, false, false
  end
  n = n + CHARGE_FIELDS
end

-- Take each charge (its bucket, then its lender) in order, as base.apply_reserve does; the
-- buckets written are those it touched: every charge's, and a lender when it lent.
for o = LEASE_HEAD, n - 1, CHARGE_FIELDS do
  local bf, lf = lease[o + 1], lease[o + 8]
  local st = loaded[bf]
  st[1] = st[1] - lease[o + 5]
  st[5] = st[5] + 1  -- held by this lease until it is settled or swept
  mark(bf)
  if lf then
    local lst = loaded[lf]
    lst[1] = lst[1] - lease[o + 6]
    lst[5] = lst[5] + 1
    mark(lf)
  end
end
local expires_at = now + r[3]
local lease_value = pack(unpack(lease, 1, n))
if next_expiry == nil or expires_at < next_expiry then next_expiry = expires_at end
if next_expiry ~= stored_next then
  flush(names, lease_field, lease_value, 'next', next_expiry)
else
  flush(names, lease_field, lease_value)
end
redis.call('ZADD', expiry_key, expires_at, id)
if not expired then return 1 end
local out = {1, 0, '', ''}
for _, x in ipairs(expired) do out[#out + 1] = x end
return out
