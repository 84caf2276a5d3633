-- budgetguard acknowledge: drop journal entries whose ledger records are stored.
-- KEYS: state hash, expiry zset, full zset, journal zset.  ARGV: reservation ids.
-- Reply: how many entries were dropped (0: unknown, or acknowledged before).
local gone = redis.call('ZREM', journal_key, unpack(ARGV))
if gone == 0 then return 0 end
local fields = {}
for i, id in ipairs(ARGV) do fields[i] = 'j:' .. id end
redis.call('HDEL', state_key, unpack(fields))
count_journal()
return gone
