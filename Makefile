# DermML: `make demo` and `make test` work on a fresh clone (they create .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test test-slow test-fast lint lock clean images

IMAGE ?= ghcr.io/dermml/dermml
IMAGE_GPU ?= ghcr.io/dermml/dermml-gpu
TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
GIT_COMMIT := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)

$(STAMP): requirements/lock.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" wheel setuptools
	# pip, not uv: pip takes torch from the machine's local wheel files.
	$(BIN)/python -m pip install -q -r requirements/lock.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dermml demo

# make test stays under 15 minutes on 2 cores; the tests marked slow (other tasks through the
# same pipeline, S3 fault tolerance) run in make test-slow, which CI (.ci/run) runs too.
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=15 -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m slow

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check dermml components pipelines tests benchmarks

# Re-pin after editing requirements/*.in (keeps the install reproducible). Two files:
# lock-runtime.txt, the runtime closure of base.in that the images install, and lock.txt, the
# same pins plus the dev tools of dev.in (pytest, moto, ruff, ...) for `make install`.
lock:
	rm -rf /tmp/dermml-lock && $(PYTHON) -m venv /tmp/dermml-lock
	/tmp/dermml-lock/bin/pip install -q -r requirements/base.in
	{ sed -n '/^#/p' requirements/lock-runtime.txt; \
	  /tmp/dermml-lock/bin/pip freeze --exclude-editable; } > /tmp/dermml-lock/runtime.txt
	mv /tmp/dermml-lock/runtime.txt requirements/lock-runtime.txt
	/tmp/dermml-lock/bin/pip install -q -r requirements/dev.in -c requirements/lock-runtime.txt
	/tmp/dermml-lock/bin/pip freeze --exclude-editable > requirements/lock.txt

# Container images of the components (needs a Docker engine; none runs on the CI machine), each
# with an SPDX SBOM written by syft (https://github.com/anchore/syft) from the built image:
# $(SBOM_DIR)/dermml-$(TAG).spdx.json and dermml-gpu-$(TAG).spdx.json. Attach them to the pushed
# images with e.g. `cosign attest --type spdxjson --predicate <sbom> <image>@<digest>`.
SBOM_DIR ?= build/sbom
SYFT ?= syft

images:
	@command -v $(SYFT) >/dev/null || { echo "make images writes SBOMs with syft: install it" \
		"(https://github.com/anchore/syft#installation) or set SYFT=/path/to/syft"; exit 1; }
	docker build -f components/Dockerfile --build-arg DERMML_GIT_COMMIT=$(GIT_COMMIT) \
		-t $(IMAGE):$(TAG) .
	docker build -f components/Dockerfile.gpu --build-arg DERMML_GIT_COMMIT=$(GIT_COMMIT) \
		-t $(IMAGE_GPU):$(TAG) .
	mkdir -p $(SBOM_DIR)
	$(SYFT) docker:$(IMAGE):$(TAG) -o spdx-json=$(SBOM_DIR)/dermml-$(TAG).spdx.json
	$(SYFT) docker:$(IMAGE_GPU):$(TAG) -o spdx-json=$(SBOM_DIR)/dermml-gpu-$(TAG).spdx.json

clean:
	rm -rf $(VENV) .dermml .pytest_cache
