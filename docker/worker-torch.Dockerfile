# preble-worker with the torch engine (libtorch from PyTorch 2.13.0, CUDA build): for the
# `gpu` profile of compose.yaml. Build from the repository root:
#   docker build -f docker/worker-torch.Dockerfile .
# The model directory (Hugging Face layout) is mounted at run time; see compose.yaml.

FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/torch-venv \
    && /opt/torch-venv/bin/pip install --no-cache-dir torch==2.13.0
WORKDIR /src
COPY . .
# The binary's run-time path points at the venv's torch/lib (set by the worker's build.rs).
RUN PATH=/opt/torch-venv/bin:$PATH LIBTORCH_USE_PYTORCH=1 \
    cargo build --release --locked -p preble-worker --features torch \
    && cp target/release/preble-worker /preble-worker

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home preble
# libtorch and the CUDA libraries it loads, at the path the binary was linked against.
COPY --from=build /opt/torch-venv/lib/python3.11/site-packages/torch/lib /opt/torch-venv/lib/python3.11/site-packages/torch/lib
COPY --from=build /opt/torch-venv/lib/python3.11/site-packages/nvidia /opt/torch-venv/lib/python3.11/site-packages/nvidia
COPY --from=build /preble-worker /usr/local/bin/preble-worker
USER preble
ENV PREBLE_HTTP_ADDR=0.0.0.0:9100 \
    PREBLE_ENGINE=torch \
    PREBLE_DEVICE=cuda \
    PREBLE_MODEL_DIR=/models/model \
    PREBLE_LOG_FORMAT=json
EXPOSE 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=5 \
    CMD curl -fsS http://127.0.0.1:9100/health || exit 1
ENTRYPOINT ["/usr/local/bin/preble-worker"]
