-- budgetguard snapshot: one bucket brought up to now, read-only.
-- KEYS: state hash.  ARGV: bucket hex, capacity, refill, period_start, period_end ('' = none).
-- Reply: 'level updated_at period_start spent' in one string ('-' for no period).
now = server_now()
local spec = {cap = tonumber(ARGV[2]), rate = tonumber(ARGV[3]), ps = num(ARGV[4]), pe = num(ARGV[5])}
local st = refresh(load('b:' .. ARGV[1]), spec, now)
return fmt(st.l) .. ' ' .. fmt(st.u) .. ' ' .. (st.p and fmt(st.p) or '-') .. ' ' .. fmt(st.s)
