-- budgetguard snapshot: one bucket brought up to now, read-only.
-- KEYS: state hash.  ARGV: bucket hex, capacity, refill, period_start, period_end ('' = none).
-- Reply: 'level updated_at period_start spent' in one string ('-' for no period).
now = server_now()
local function num(s)
  if s == '' then return false end
  return tonumber(s)
end
local st = touch('b:' .. ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), num(ARGV[4]), num(ARGV[5]))
return fmt(st[1]) .. ' ' .. fmt(st[2]) .. ' ' .. (st[3] and fmt(st[3]) or '-') .. ' ' .. fmt(st[4])
