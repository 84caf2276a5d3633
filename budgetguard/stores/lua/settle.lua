-- budgetguard settle: once per lease; a lease that is gone (settled, swept) returns 0.
-- KEYS: state hash, expiry zset.
-- ARGV[1]: MessagePack values: the id, then the actual amounts, or false to charge the
--   reserved amounts.
-- Calls: TIME, HGET (lease), HMGET (its buckets), HSET (buckets), HDEL (lease), ZREM.
now = server_now()
local actuals = {cmsgpack.unpack(ARGV[1])}
local id = table.remove(actuals, 1)
if actuals[1] == false then actuals = nil end
local lease_field = 'r:' .. id
local raw = redis.call('HGET', state_key, lease_field)
if not raw then return 0 end
local lease = decode_lease(raw)
if actuals ~= nil then
  if #actuals < #lease.held then
    return redis.error_reply('budgetguard: ' .. #actuals .. ' actual amounts for ' .. #lease.held .. ' charges')
  end
end
prefetch(held_fields(lease.held, {}))
local get, keep = new_phase()
settle_held(get, lease.held, actuals)
keep()
flush(nil)
redis.call('HDEL', state_key, lease_field)
redis.call('ZREM', expiry_key, id)
return 1
