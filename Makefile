# Thin wrapper: every target is one nox session. `make help` lists them.
PY ?= python3
TOOLS := .tools
NOX := $(TOOLS)/bin/nox
# Versions of the tools that drive everything else (the only place they are pinned).
TOOL_PINS := nox==2026.10.20 uv==0.13.9
# The image's Python (major.minor): by default that of $(PY), i.e. of the environment that runs
# make (after `module load python/3.12.12` on Aurora: 3.12), so its venv can drive the workers.
PYTHON ?= $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')

.PHONY: help test lint demo bench scale image lock publish pull install-apptainer clean

help: ## show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

$(NOX):
	$(PY) -m venv $(TOOLS) && $(TOOLS)/bin/pip install -q $(TOOL_PINS)

test: $(NOX) ## run the tests (creates its own environments)
	$(NOX) -s lint
	$(NOX) -s tests -- $(ARGS)

lint: $(NOX) ## check style with ruff
	$(NOX) -s lint

demo: $(NOX) ## run examples/workflow.py on the fake cluster
	$(NOX) -s demo

bench: $(NOX) ## benchmark against hand-tuned Parsl, rewrite docs/benchmarks.md [ARGS=--quick]
	$(NOX) -s bench -- $(ARGS)

scale: $(NOX) ## thousands of simulated pools against the real interchange, rewrite docs/scale.md [ARGS=--quick]
	$(NOX) -s scale -- $(ARGS)

image: $(NOX) ## build aurora.sif for PYTHON=X.Y (default: python3's); EXTRA=requirements.txt [EXTRA_DATE=] adds yours
	$(NOX) -s image -- --python $(PYTHON) $(if $(EXTRA),--extra $(EXTRA)) $(if $(EXTRA_DATE),--extra-date $(EXTRA_DATE)) $(ARGS)

lock: $(NOX) ## recompile container/requirements-X.Y.lock [PYTHON=X.Y] from pyproject.toml
	$(NOX) -s lock -- --python $(PYTHON)

publish: $(NOX) ## sign and push aurora.sif: REGISTRY=oras://host/repo SIGN_KEY=key.pem [TAG=] [INSECURE=1]
	$(NOX) -s publish -- $(REGISTRY) --key $(SIGN_KEY) $(if $(TAG),--tag $(TAG)) $(if $(filter 1,$(INSECURE)),--insecure)

pull: $(NOX) ## fetch and verify: REGISTRY=oras://host/repo TAG=t VERIFY_KEY=pub.pem [INSECURE=1]
	$(NOX) -s pull -- $(REGISTRY) $(TAG) --verify-key $(VERIFY_KEY) $(if $(filter 1,$(INSECURE)),--insecure)

install-apptainer: ## install apptainer on Debian 12 (root; CI runs this)
	bash .ci/install-apptainer

clean: ## remove tool and session environments, run directories and the image
	rm -rf $(TOOLS) .nox runinfo .wheelhouse .image-cache aurora.sif aurora.sif.partial
