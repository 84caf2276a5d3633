-- budgetguard snapshot: one bucket brought up to now, read-only.
-- KEYS: state hash.  ARGV[1]: MessagePack values bucket hex, capacity, refill, period rule
-- (false: none).
-- Reply: 'level updated_at period_start spent' in one string ('-' for no period).
now = server_now()
local hex, cap, rate, rule = cmsgpack.unpack(ARGV[1])
local st = touch('b:' .. hex, cap, rate, rule)
return fmt(st[1]) .. ' ' .. fmt(st[2]) .. ' ' .. (st[3] and fmt(st[3]) or '-') .. ' ' .. fmt(st[4])
