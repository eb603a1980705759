# preble-worker: built in the Rust image, run in slim Debian as a non-root user.
# Build from the repository root: docker build -f docker/worker.Dockerfile .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p preble-worker -p preble-modelgen \
    && mkdir -p /out/models \
    && ./target/release/preble-modelgen --out /out/models/preble-sim \
    && cp target/release/preble-worker /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home preble
COPY --from=build /out/preble-worker /usr/local/bin/preble-worker
COPY --from=build /out/models /opt/preble/models
USER preble
ENV PREBLE_HTTP_ADDR=0.0.0.0:9100 \
    PREBLE_MODEL_DIR=/opt/preble/models/preble-sim \
    PREBLE_LOG_FORMAT=json
EXPOSE 9100
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=5 \
    CMD curl -fsS http://127.0.0.1:9100/health || exit 1
ENTRYPOINT ["/usr/local/bin/preble-worker"]
