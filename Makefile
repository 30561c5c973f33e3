# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
BIN := $(VENV)/bin
# These torch/torchvision builds lie on the machines' disk; a bare `torch` would pull a CUDA build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

$(BIN)/initaudit: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[arch,test]'
	touch $@

.PHONY: demo test test-slow bench fixtures
# The first model is the selection guide's bug (Xavier feeding 12 ReLU layers): its check exits 1 with the
# findings, which is the demo; any other exit (2: it could not be read, 0: the bug went unseen) fails it.
demo: $(BIN)/initaudit
	$(BIN)/initaudit check fixtures/deep_relu_mlp_xavier.pt --activation relu || test $$? -eq 1
	$(BIN)/initaudit check fixtures/resnet_kaiming.pt

# The default suite (under 10 minutes on 2 idle cores); the long sweeps marked `slow` run in test-slow.
test: $(BIN)/initaudit
	$(BIN)/python -m pytest -q -n auto -m "not slow"

test-slow: $(BIN)/initaudit
	$(BIN)/python -m pytest -q -n auto -m slow

bench: $(BIN)/initaudit
	$(BIN)/python benchmarks/bench_check.py

fixtures: $(BIN)/initaudit
	$(BIN)/python fixtures/make_fixtures.py
