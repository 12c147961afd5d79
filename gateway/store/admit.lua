-- Admit one request for one key, atomically, on Redis's clock.
-- Mirrors gateway/store/memory.py (`decide` and MemoryLimiter.admit) line for line.
-- KEYS: 1 window zset (lease -> admitted_at), 2 window tokens hash (lease -> tokens, '#sum'),
--       3 leases zset (lease -> expires_at), 4 monthly hash (YYYY-MM -> tokens)
-- ARGV: lease_id, tokens, lease_seconds, rpm, tpm, max_concurrent, monthly (-1 = unlimited)
-- Returns 7 space-separated integers, times in microseconds, -1 = None:
--   {kind (0 admitted, 1 concurrency, 2 requests, 3 tokens, 4 monthly), retry_us,
--    requests_remaining, requests_reset_us, tokens_remaining, tokens_reset_us, now_us}
local WINDOW = 60
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = now_us / 1000000
local lease, tokens, lease_s = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local rpm, tpm, mc, mt = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])

-- the UTC calendar month of `now` (Hinnant's civil-from-days) and the start of the next one
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function days_from_civil(y, m)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5)
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end
local year, month = civil(math.floor(now / 86400))
local month_field = string.format('%04d-%02d', year, month)

redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local windowed = rpm >= 0 or tpm >= 0
local count, tsum = 0, 0
if windowed then
  local cutoff = now - WINDOW
  while true do  -- prune in batches: unpack() has a stack limit
    local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, 500)
    if #old == 0 then break end
    local vals = redis.call('HMGET', KEYS[2], unpack(old))
    local freed = 0
    for i = 1, #vals do freed = freed + (tonumber(vals[i]) or 0) end
    redis.call('HDEL', KEYS[2], unpack(old))
    redis.call('ZREM', KEYS[1], unpack(old))
    if freed ~= 0 then redis.call('HINCRBY', KEYS[2], '#sum', -freed) end
    if #old < 500 then break end
  end
  count = redis.call('ZCARD', KEYS[1])
  if count > 0 then tsum = tonumber(redis.call('HGET', KEYS[2], '#sum') or '0') end
end

local function entry_time(index)
  return tonumber(redis.call('ZRANGE', KEYS[1], index, index, 'WITHSCORES')[2])
end

local kind, retry = 0, 0
if mc == 0 then kind, retry = 1, -1
elseif rpm == 0 then kind, retry = 2, -1
elseif tpm >= 0 and tokens > tpm then kind, retry = 3, -1
elseif mt >= 0 and tokens > mt then kind, retry = 4, -1
elseif mc > 0 and redis.call('ZCARD', KEYS[3]) >= mc then
  kind = 1
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  retry = math.max(0, math.min(1.0, tonumber(first[2]) - now))
elseif rpm > 0 and count >= rpm then
  kind = 2
  retry = math.max(0, entry_time(count - rpm) + WINDOW - now)
elseif tpm >= 0 and tsum + tokens > tpm then
  kind = 3
  local need = tsum + tokens - tpm
  local flat = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  local ids = {}
  for i = 1, #flat, 2 do ids[#ids + 1] = flat[i] end
  local vals = redis.call('HMGET', KEYS[2], unpack(ids))
  local freed = 0
  retry = WINDOW
  for i = 1, #vals do
    freed = freed + (tonumber(vals[i]) or 0)
    if freed >= need then
      retry = math.max(0, tonumber(flat[2 * i]) + WINDOW - now)
      break
    end
  end
elseif mt >= 0 and tonumber(redis.call('HGET', KEYS[4], month_field) or '0') + tokens > mt then
  kind = 4
  local ny, nm = year, month + 1
  if nm == 13 then ny, nm = year + 1, 1 end
  retry = days_from_civil(ny, nm) * 86400 - now
end

local allowed = kind == 0
if allowed then
  if windowed then
    redis.call('ZADD', KEYS[1], now, lease)
    redis.call('PEXPIRE', KEYS[1], (WINDOW + 1) * 1000)
    if tpm >= 0 then  -- token entries matter only under a tokens limit
      redis.call('HSET', KEYS[2], lease, tokens)
      redis.call('HINCRBY', KEYS[2], '#sum', tokens)
      redis.call('PEXPIRE', KEYS[2], (WINDOW + 1) * 1000)
    end
  end
  redis.call('ZADD', KEYS[3], now + lease_s, lease)
  -- lease_seconds is one gateway-wide setting, so the newest lease expires last
  redis.call('PEXPIRE', KEYS[3], math.ceil(lease_s * 1000) + 1000)
  redis.call('HINCRBY', KEYS[4], month_field, tokens)
  count, tsum = count + 1, tsum + tokens
end

local req_remaining, req_reset = -1, 0
if rpm >= 0 then
  req_remaining = math.max(0, rpm - count)
  if rpm > 0 and count >= rpm then
    local index = count - rpm
    local oldest = now
    if not (allowed and index >= count - 1) then oldest = entry_time(index) end
    req_reset = math.max(0, oldest + WINDOW - now)
  end
end
local tok_remaining, tok_reset = -1, 0
if tpm >= 0 then
  tok_remaining = math.max(0, tpm - tsum)
  if tsum > 0 then
    local newest = now
    if not allowed then
      local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
      if last[2] then newest = tonumber(last[2]) end
    end
    tok_reset = math.max(0, newest + WINDOW - now)
  end
end
local function us(x) if x < 0 then return -1 end return math.floor(x * 1000000) end
-- one bulk string parses far cheaper on the client than a 7-element array
return string.format('%d %d %d %d %d %d %d', kind, us(retry), req_remaining, us(req_reset),
  tok_remaining, us(tok_reset), now_us)
