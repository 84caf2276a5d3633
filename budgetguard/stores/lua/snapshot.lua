-- budgetguard snapshot: one bucket brought up to now, read-only.
-- KEYS: bucket key.  ARGV: capacity, refill, period_start, period_end ('' = none).
-- Reply: 'level updated_at period_start spent' in one string ('-' for no period).
now = server_now()
local spec = {cap = tonumber(ARGV[1]), rate = tonumber(ARGV[2]), ps = num(ARGV[3]), pe = num(ARGV[4])}
local st = refresh(load(KEYS[1]), spec, now)
return fmt(st.l) .. ' ' .. fmt(st.u) .. ' ' .. (st.p and fmt(st.p) or '-') .. ' ' .. fmt(st.s)
