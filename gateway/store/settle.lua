-- Settle one admitted request atomically: refund, free the slot, add to the usage ledger.
-- Mirrors MemoryLimiter.settle; the refund happens only while the lease is held, so a
-- second settle of the same lease records usage but never refunds twice. A settlement of a
-- request admitted locally during an outage (ARGV[12] = 1) reserved nothing here: its whole
-- use is charged to the monthly counter.
-- KEYS: 1 window zset, 2 window tokens hash, 3 leases zset, 4 monthly hash,
--       5 usage hash of the day, 6 set of usage days
-- ARGV: lease_id, month (YYYY-MM of admitted_at), reserved, used, field prefix
--       ("key_id\tmodel\t"), day, requests, prompt, completion, guardrail, errors, local
if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then
  local used = tonumber(ARGV[4])
  local entry = redis.call('HGET', KEYS[2], ARGV[1])
  if entry then
    redis.call('HSET', KEYS[2], ARGV[1], used)
    redis.call('HINCRBY', KEYS[2], '#sum', used - tonumber(entry))
  end
  local delta = used - tonumber(ARGV[3])
  if delta ~= 0 then
    local total = redis.call('HINCRBY', KEYS[4], ARGV[2], delta)
    if total < 0 then redis.call('HSET', KEYS[4], ARGV[2], 0) end
  end
elseif ARGV[12] == '1' and tonumber(ARGV[4]) > 0 then
  redis.call('HINCRBY', KEYS[4], ARGV[2], ARGV[4])
end
local names = {'requests', 'prompt_tokens', 'completion_tokens', 'guardrail_tokens', 'errors'}
for i = 1, 5 do
  local n = tonumber(ARGV[6 + i])
  if n ~= 0 or i == 1 then redis.call('HINCRBY', KEYS[5], ARGV[5] .. names[i], n) end
end
redis.call('SADD', KEYS[6], ARGV[6])
return 0
