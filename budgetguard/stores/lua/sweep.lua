-- budgetguard sweep: settle due leases at their reserved amounts.
-- KEYS: state hash, expiry zset.  Reply: {id, meta, amounts, ...}.
now = server_now()
local expired, _, next_expiry = sweep(SWEEP_LIMIT)
flush(nil, next_expiry and 'next', next_expiry)
return expired
