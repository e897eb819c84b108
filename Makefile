# Two entry points: `make demo` and `make test`. Both create .venv and install the project first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo_out
DEMO_LESION ?= 0.01

.PHONY: demo test test-fast bench clean

$(BIN)/mil: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev,workflow]'
	touch $@

## demo: the whole pipeline on a synthetic cohort whose positive slides carry a small planted lesion:
# extract (tiles + features) -> train abmil, and abmil with the HNM-WSI loss recipe -> evaluate -> compare -> heatmap.
# Random encoder weights: nothing can be downloaded here. Use --weights imagenet or a MoCo checkpoint on real data.
# Every step skips work already done, so a second `make demo` only prints the results again.
DEMO_TRAIN := --manifest $(DEMO)/slides/manifest.csv --epochs 40 --patience 15 --seed 0 --no-progress
demo: $(BIN)/mil
	$(BIN)/mil extract synthetic $(DEMO)/slides --n-slides 40 --size 8192 --seed 0 --lesion-fraction $(DEMO_LESION)
	$(BIN)/mil extract features $(DEMO)/slides/manifest.csv --out $(DEMO)/features \
		--encoder resnet18 --weights none --batch-size 32 --workers 2 --target-mpp 0.5 --tile-size 224
	$(BIN)/mil train features $(DEMO)/features $(DEMO_TRAIN) --out $(DEMO)/runs/abmil
	$(BIN)/mil train features $(DEMO)/features $(DEMO_TRAIN) --out $(DEMO)/runs/abmil_hnm \
		--recipe hnm-wsi
	$(BIN)/mil evaluate run $(DEMO)/runs/abmil
	$(BIN)/mil evaluate run $(DEMO)/runs/abmil_hnm
	$(BIN)/mil evaluate compare $(DEMO)/runs/abmil $(DEMO)/runs/abmil_hnm
	$(BIN)/mil evaluate heatmap $(DEMO)/runs/abmil --slide synth_000 --slides $(DEMO)/slides/manifest.csv \
		--out $(DEMO)/heatmap_abmil_synth_000.png
	$(BIN)/mil evaluate heatmap $(DEMO)/runs/abmil_hnm --slide synth_000 --slides $(DEMO)/slides/manifest.csv \
		--out $(DEMO)/heatmap_abmil_hnm_synth_000.png

## test: the whole default suite (what CI runs)
test: $(BIN)/mil
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/mil
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(BIN)/mil
	$(BIN)/python benchmarks/tiling.py
	$(BIN)/python benchmarks/extract_throughput.py
	$(BIN)/python benchmarks/precision_agreement.py
	$(BIN)/python benchmarks/extract_memory.py
	$(BIN)/python benchmarks/musk.py
	$(BIN)/python benchmarks/needle_bags.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/heatmap.py
	$(BIN)/python benchmarks/moco.py
	$(BIN)/python benchmarks/reliability.py
	$(BIN)/python benchmarks/bagnet_norm.py
	$(BIN)/python benchmarks/bagnet_step.py
	$(BIN)/python benchmarks/o2i_study.py

clean:
	rm -rf $(DEMO) build dist *.egg-info
