# The two commands a new user runs: `make up` (the platform, locally) and `make test`.
.PHONY: up test bench bench-smoke soak fuzz vllm-test bootstrap

bootstrap:
	scripts/bootstrap.sh

up: bootstrap
	.venv/bin/plateforme up

test: bootstrap
	scripts/ensure-redis.sh
	PLATEFORME_VLLM_VENV=$${PLATEFORME_VLLM_VENV:-$$HOME/.cache/plateforme/vllm-venv} scripts/setup-vllm.sh
	PLATEFORME_VLLM_VENV=$${PLATEFORME_VLLM_VENV:-$$HOME/.cache/plateforme/vllm-venv} .venv/bin/pytest

vllm-test: bootstrap
	PLATEFORME_VLLM_VENV=$${PLATEFORME_VLLM_VENV:-$$HOME/.cache/plateforme/vllm-venv} PYTHON=.venv/bin/python scripts/test-vllm.sh

# The gateway's own cost against calling the upstream directly (needs wrk; nginx-light for
# the static upstream, else the simulator stands in). BENCH_ARGS=--profile adds a py-spy
# breakdown (.venv/bin/pip install py-spy).
bench: bootstrap
	scripts/ensure-redis.sh
	.venv/bin/python bench/gateway_bench.py $(BENCH_ARGS)

bench-smoke: bootstrap
	scripts/ensure-redis.sh
	.venv/bin/python bench/gateway_bench.py --smoke

# The long forms of the reliability tests (CI runs them short): a 5-minute soak through two
# gateways, and thousands of schema-generated cases per route.
soak:
	PLATEFORME_SOAK_SECONDS=$${PLATEFORME_SOAK_SECONDS:-300} .venv/bin/pytest tests/integration/test_soak.py

fuzz:
	PLATEFORME_FUZZ_EXAMPLES=$${PLATEFORME_FUZZ_EXAMPLES:-2000} .venv/bin/pytest tests/integration/test_fuzz.py
