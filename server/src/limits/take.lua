-- Takes tokens from several buckets at once, all or none: the GCRA of gcra.rs, per bucket.
-- KEYS: the buckets. ARGV[1]: now (ms); then per bucket i: ARGV[3i-1] its refill interval
-- (ms), ARGV[3i] its capacity, ARGV[3i+1] the cost.
-- Returns {0, 0} when every bucket had enough (they are all charged), or else the milliseconds
-- until the slowest of them would have and its index (none is charged).
local now = tonumber(ARGV[1])
local wait = 0
local worst = 0
local next = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 1])
  local capacity = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  next[i] = tat + cost * interval
  local over = next[i] - now - capacity * interval
  if over > wait then
    wait = over
    worst = i
  end
end
if wait > 0 then return {wait, worst} end
for i, key in ipairs(KEYS) do
  -- The bucket is full again at its instant: Redis may forget it then.
  redis.call('SET', key, string.format('%d', next[i]), 'PX', string.format('%d', next[i] - now))
end
return {0, 0}
