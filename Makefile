# neuroserve: `make serve` installs and serves the committed models; `make test` installs and tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= $(abspath ../shared/data)
URL    ?= http://127.0.0.1:8000

.PHONY: serve test stack loadtest lint format train-image-classification train-sentiment train-rating train-translation train-text-generation train-object-detection train-image-generation train-digit-ood train-face-recognition bench bench-translation bench-object-detection clean
DURATION ?= 60s
USERS    ?= 32

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Serving needs only the base dependencies (no torch).
$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Tests also train (a smoke run), so they need the `train` extra: torch 2.13.0, the CPU build.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,train,load]'
	touch $@ $(VENV)/.serve

serve: $(VENV)/.serve
	$(BIN)/neuroserve serve

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error
	NEUROSERVE_TEST_DATA=$(DATA) $(BIN)/pytest -q

# The deployment for real (needs a Docker engine; ../shared/docker/with-docker.sh provides one):
# build the images, compose stack up healthy, every endpoint through nginx, locust with a replica restart.
stack: $(VENV)/.dev
	../shared/docker/with-docker.sh deploy/ci-stack.sh $(abspath $(BIN))/python

# Locust, headless, against URL; writes loadtest_stats.csv (and friends) and loadtest.html.
loadtest: $(VENV)/.dev
	NEUROSERVE_TEST_DATA=$(DATA) $(BIN)/locust -f locustfile.py --headless -u $(USERS) -r 8 -t $(DURATION) \
		--host $(URL) --csv loadtest --html loadtest.html

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

train-image-classification: $(VENV)/.dev
	$(BIN)/python -m training.image_classification --data-dir $(DATA)/image_classification/mnist --output-dir models --version 1

train-sentiment: $(VENV)/.dev
	$(BIN)/python -m training.sentiment --lang en --data-dir $(DATA)/sentiment --output-dir models --version 6 --arch bilstm --epochs 10 --word-dropout 0.1 --distil 4 --unlabelled $(DATA)/translation/fra-eng.zip --everyday-synthetic 12000 --everyday-talk 0.5 --written training/everyday_written.tsv training/everyday_written2.tsv --vocab-size 24000
	$(BIN)/python -m training.sentiment --lang zh --data-dir $(DATA)/sentiment --output-dir /tmp/zh-ens --version 2 --arch cnn --epochs 15 --embed-dim 192 --dropout 0.3 --bigram-buckets 50000 --max-len 512 --ensemble 5
	$(BIN)/python -m training.sentiment --lang zh --data-dir $(DATA)/sentiment --output-dir /tmp/zh-lstm --version 2 --arch bilstm --epochs 10 --word-dropout 0.1 --embed-dim 192 --hidden 256 --max-len 512
	$(BIN)/python -m training.sentiment --lang zh --data-dir $(DATA)/sentiment --max-len 512 --max-batch-size 8 --combine /tmp/zh-ens/sentiment-zh/2 /tmp/zh-lstm/sentiment-zh/2 --half-embeddings --output-dir models --version 3

train-rating: $(VENV)/.dev
	$(BIN)/python -m training.rating --data-dir $(DATA)/rating/ml-latest-small --output-dir models --version 1

train-translation: $(VENV)/.dev
	$(BIN)/python -m training.translation --data-dir $(DATA)/translation --output-dir models --version 1

# An LSTM language model over byte-level BPE (Tatoeba English), with its character n-gram baseline.
train-text-generation: $(VENV)/.dev
	$(BIN)/python -m training.text_generation --data-dir $(DATA)/translation --output-dir models --version 1 --threads 2 --dropout 0.3 --weight-drop 0 --no-variational

# The committed generator: the seeds' MLP GAN first (the baseline its metadata compares with), then the DCGAN.
train-image-generation: $(VENV)/.dev
	$(BIN)/python -m training.image_generation --data-dir $(DATA)/image_classification/mnist --arch mlp --epochs 25 --output-dir /tmp/neuroserve-gan-mlp
	$(BIN)/python -m training.image_generation --data-dir $(DATA)/image_classification/mnist --arch dcgan --epochs 10 \
		--baseline /tmp/neuroserve-gan-mlp/digit-generator/1/metadata.json

train-digit-ood: $(VENV)/.dev
	$(BIN)/python -m training.digit_ood --data-dir $(DATA)/image_classification/mnist --coco-dir $(DATA)/object_detection/coco128/images

# Face recognition: the face detector (LFW faces in coco128 photos), then the embedding network with
# its verification protocol and LBP baseline (both on 2 CPU cores; see the README's model table).
train-face-recognition: $(VENV)/.dev
	$(BIN)/python -m training.object_detection --dataset faces --data-dir $(DATA) --name face-detector \
		--input-size 256 --width 16 --train-scenes 6000 --test-scenes 500 --epochs 8 --max-detections 20 --score-threshold 0.5
	$(BIN)/python -m training.face_recognition --data-dir $(DATA)/face_recognition --epochs 30 --threads 2

# The committed digit detector: two stages on photo scenes (--device cuda where there is a GPU), then a
# fine-tune on photo and paper scenes together (v2), and one on the fixed paper scenes (v3) (2 CPU cores).
train-object-detection: $(VENV)/.dev
	$(BIN)/python -m training.object_detection --data-dir $(DATA) --paper-scenes 0
	$(BIN)/python -m training.object_detection --data-dir $(DATA) --paper-scenes 0 --input-size 384 --epochs 14 --lr 1e-3 \
		--init-from checkpoints/digit-detector.pt
	$(BIN)/python -m training.object_detection --data-dir $(DATA) --input-size 384 --train-size 320 --train-scenes 10000 \
		--paper-scenes 12000 --epochs 3 --lr 1e-3 --init-from models/digit-detector/1/model.onnx --version 2 \
		--checkpoint-dir /tmp/neuroserve-detector
	$(BIN)/python -m training.object_detection --data-dir $(DATA) --input-size 384 --train-scenes 10000 --paper-scenes 4000 \
		--epochs 1 --lr 3e-4 --init-from models/digit-detector/2/model.onnx --version 3 --checkpoint-dir /tmp/neuroserve-detector

# Needs wrk (Debian: apt-get install wrk). Prints a table, writes bench/results/*.json.
bench: $(VENV)/.dev
	$(BIN)/python -m bench.run

bench-object-detection: $(VENV)/.dev
	$(BIN)/python -m bench.object_detection

# Translation: the decoder step with and without a KV cache, then one-at-a-time vs request-level vs
# step-level decoding through the server (no wrk needed).
bench-translation: $(VENV)/.dev
	$(BIN)/python -m bench.decoder_cache
	$(BIN)/python -m bench.translation

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
