# Thin aliases for ./hack (README's two commands): `make run`, `make test`.
.PHONY: run test install clean
ARGS ?=

run:
	./hack run $(ARGS)

test:
	./hack test $(PYTEST_ARGS)

install:
	./hack install

clean:
	rm -rf .venv
