-- budgetguard sweep: settle due leases at their reserved amounts.
-- KEYS: leases hash, expiry zset.  Reply: {id, meta, amounts, ...}.
now = server_now()
local expired = sweep(KEYS[1], KEYS[2], SWEEP_LIMIT)
write_dirty(nil)
return expired
