-- budgetguard sweep: settle due leases at their reserved amounts; forget full buckets.
-- KEYS: state hash, expiry zset, full zset.  Reply: {id, meta, amounts, ...}.
now = server_now()
local expired, _, next_expiry = sweep(SWEEP_LIMIT)
flush(nil, next_expiry and 'next', next_expiry)
forget(FORGET_PER_SWEEP)
return expired
