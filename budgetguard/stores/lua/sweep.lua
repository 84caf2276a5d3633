-- budgetguard sweep: settle due leases at their reserved amounts into the journal; forget
-- full buckets; report the journal.
-- KEYS: state hash, expiry zset, full zset, journal zset.  Reply: {id, meta, amounts, ...}.
now = server_now()
local _, next_expiry = sweep(SWEEP_LIMIT)
flush(nil, next_expiry and 'next', next_expiry)
forget(FORGET_PER_SWEEP)
return report()
