-- budgetguard settle: once per lease; a lease that is gone (settled, swept) returns 0.
-- KEYS: leases hash, expiry zset.
-- ARGV[1]: JSON [id, [actual amounts]] or [id, false] (charge the reserved amounts).
now = server_now()
local leases_key, expiry_key = KEYS[1], KEYS[2]
local request = cjson.decode(ARGV[1])
local id, actuals = request[1], request[2] or nil
local raw = redis.call('HGET', leases_key, id)
if not raw then return 0 end
local lease = decode_lease(raw)
if actuals ~= nil then
  if #actuals < #lease.held then
    return redis.error_reply('budgetguard: ' .. #actuals .. ' actual amounts for ' .. #lease.held .. ' charges')
  end
end
local get, keep = new_phase()
settle_held(get, lease.held, actuals)
keep()
write_dirty(nil)
redis.call('HDEL', leases_key, id)
redis.call('ZREM', expiry_key, id)
return 1
