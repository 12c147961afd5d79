#!/usr/bin/env bash
# Make sure a Redis answers on 127.0.0.1:6379 for the test suite: use the running one, or
# start redis-server (no persistence; tests clean only their own key prefix). Fails loudly
# when neither is possible (the suite never skips Redis tests silently).
set -euo pipefail
if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    exit 0
fi
if ! command -v redis-server >/dev/null; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
    else
        echo "ensure-redis: no Redis on 127.0.0.1:6379 and no redis-server to start" >&2
        exit 1
    fi
fi
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/plateforme-ci-redis.log
for _ in $(seq 50); do
    redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && exit 0
    sleep 0.1
done
echo "ensure-redis: redis-server did not answer" >&2
exit 1
