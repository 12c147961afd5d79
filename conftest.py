"""Root conftest: loads the shared fixture plugins (Redis server, gateway/simulator processes)."""

pytest_plugins = ["tests.fixtures.redis_server", "tests.fixtures.procs"]
