-- budgetguard settle: once per lease; a lease that is gone (settled, swept) returns 0.
-- KEYS: state hash, expiry zset, full zset, journal zset (unused).
-- ARGV[1]: MessagePack values: the id, then the actual amounts, or false to charge the
--   reserved amounts.
-- Calls: TIME, HGET (lease), HMGET or HGET (its buckets), HSET (buckets), ZADD (when they
-- are full again), HDEL (lease), ZREM, ZRANGEBYSCORE (buckets to forget; when some are:
-- HMGET, ZREM, HDEL).
now = server_now()
local a = {cmsgpack.unpack(ARGV[1])}
local id = a[1]
local lease_field = 'r:' .. id
local raw = redis.call('HGET', state_key, lease_field)
if not raw then return 0 end
local lease = decode_lease(raw)
local actuals = a
if a[2] == false then
  actuals = nil
else
  local charges = (#lease - LEASE_HEAD) / CHARGE_FIELDS
  if #a - 1 < charges then
    return redis.error_reply('budgetguard: ' .. (#a - 1) .. ' actual amounts for ' .. charges .. ' charges')
  end
end
-- Several buckets: one HMGET; else touch() reads the one bucket with HGET.
if #lease > LEASE_HEAD + CHARGE_FIELDS or lease[LEASE_HEAD + 8] then
  load_fields(prefetch(lease, {}, {}))
end
settle_lease(lease, actuals, 2)
flush(nil)
redis.call('HDEL', state_key, lease_field)
redis.call('ZREM', expiry_key, id)
forget(FORGET_PER_SETTLE)
return 1
