PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test test-all bench gpu-report demo compare clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -r requirements.txt
	touch $@

test: $(VENV)/.installed  ## fast test suite (what CI runs)
	$(PY) -m pytest -q

test-all: $(VENV)/.installed  ## including tests marked slow
	$(PY) -m pytest -q -m ""

gpu-report: $(VENV)/.installed  ## every GPU figure (CUDA): gpu_report.md, gpu_report.json
	$(PY) benchmarks/gpu_report.py

bench: $(VENV)/.installed  ## selective-scan, forward-pass, data-loader and subset-evaluation benchmarks
	$(PY) benchmarks/bench_scan.py
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_subsets.py

# The demo: 30 synthetic 64 x 64 x 48 cases (21 train, 3 validation, 6 test), a small IM-Fuse
# (paper structure: I-MFB, Mamba skips; patch 32, widths 4-64, token dim 64) trained for 800
# iterations on the CPU, then all 15 subsets evaluated on the 6 held-out cases.
DEMO ?= demo
DEMO_MODEL := --patch_size 32 --interleaved_tokenization --mamba_skip --width 4 --dim 64 \
	--heads 4 --mlp_dim 128 --dropout 0
demo: $(VENV)/.installed  ## synthetic cohort -> preprocess -> train -> 15-subset table (CPU, ~8 min)
	rm -rf $(DEMO)
	$(PY) -m data.synthetic --out $(DEMO)/raw --cases 30 --seed 0 --size 64 64 48 --workers 2
	$(PY) preprocess.py --input-path $(DEMO)/raw --output-path $(DEMO)/data --min-size 32 --workers 2
	$(PY) train_poly.py --datapath $(DEMO)/data --savepath $(DEMO)/run $(DEMO_MODEL) \
		--num_epochs 80 --iter_per_epoch 10 --batch_size 2 --lr 1e-2 --val_every 20 --num_workers 0
	$(PY) test.py --datapath $(DEMO)/data --resume $(DEMO)/run/best.pth --savepath $(DEMO)/results
	@$(PY) -c "import csv; s = {r['subset']: r for r in csv.DictReader(open('$(DEMO)/results/summary.csv'))}; \
	et = lambda t1c: sum(float(r['ET']) for n, r in s.items() if n != 'mean' and ('T1c' in n.split('+')) == t1c) / (8 if t1c else 7); \
	print(f\"full-modality WT Dice {float(s['FLAIR+T1c+T1+T2']['WT']):.3f} (target >= 0.70); mean ET Dice over the 8 subsets with T1c {et(True):.3f}, over the 7 without {et(False):.3f}\")"
	@echo "outputs in $(DEMO)/: results/summary.md, results/figures/, run/ (tensorboard --logdir $(DEMO)/run)"

# Every registered model (or those of MODELS="imfuse m3ae ...") in its small configuration
# (engine/small.py: the model's small_config and small_recipe, after its small pre-training stage
# where it has one) trained on the demo's synthetic cohort, evaluated on the same 6 held-out
# cases under the 15 subsets, then compare.py against IM-Fuse.
COMPARE ?= compare_demo
MODELS ?=
compare: $(VENV)/.installed  ## all models small on the synthetic cohort -> compare.py (CPU, ~60 min)
	rm -rf $(COMPARE)
	$(PY) -m data.synthetic --out $(COMPARE)/raw --cases 30 --seed 0 --size 64 64 48 --workers 2
	$(PY) preprocess.py --input-path $(COMPARE)/raw --output-path $(COMPARE)/data --min-size 32 --workers 2
	set -e; models="$(MODELS)"; [ -n "$$models" ] || models=$$($(PY) -c "import engine, models; print(' '.join(models.list_models()))"); \
	for m in $$models; do \
		pre=$$($(PY) -m engine.small $$m --pretraining); start=""; \
		if [ -n "$$pre" ]; then \
			echo "== $$m, pre-training: $$pre"; \
			eval $(PY) train_poly.py --datapath $(COMPARE)/data --savepath $(COMPARE)/runs/$$m-pretraining \
				$$pre --num_workers 0 --no_progress | tail -n 2; \
			start="--pretrained $(COMPARE)/runs/$$m-pretraining/model_last.pth"; \
			[ -f $(COMPARE)/runs/$$m-pretraining/model_last.pth ] || { echo "pre-training of $$m failed"; exit 1; }; \
		fi; \
		flags=$$($(PY) -m engine.small $$m); echo "== $$m: $$flags $$start"; \
		eval $(PY) train_poly.py --datapath $(COMPARE)/data --savepath $(COMPARE)/runs/$$m \
			$$flags $$start --val_every 10 --num_workers 0 --no_progress | tail -n 3; \
		$(PY) test.py --datapath $(COMPARE)/data --resume $(COMPARE)/runs/$$m/best.pth \
			--savepath $(COMPARE)/results/$$m --no_progress > /dev/null; \
	done; \
	$(PY) compare.py --results $$(for m in $$models; do echo $(COMPARE)/results/$$m; done) \
		--savepath $(COMPARE)/comparison --reference imfuse > /dev/null
	@$(PY) -c "import csv; rows = list(csv.DictReader(open('$(COMPARE)/comparison/comparison.csv'))); \
	full = {r['region']: r for r in rows if r['subset'] == 'FLAIR+T1c+T1+T2'}; floor = dict(WT=0.80, TC=0.60, ET=0.50); \
	[print(f'full-modality {g} Dice (floor {floor[g]:.2f}): ' + ', '.join(f'{k} {float(v):.3f}' + ('' if float(v) >= floor[g] else ' (below)') \
	for k, v in full[g].items() if k not in ('region', 'subset', 'best'))) for g in floor]"
	@echo "outputs in $(COMPARE)/comparison/: comparison.md, comparison.csv, models.csv, significance.csv, comparison.png, subsets.png"

clean:
	rm -rf $(VENV) .pytest_cache $(DEMO) $(COMPARE)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
