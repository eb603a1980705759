# preble-gateway: built in the Rust image, run in slim Debian as a non-root user.
# Build from the repository root: docker build -f docker/gateway.Dockerfile .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p preble-gateway -p preble-modelgen \
    && mkdir -p /out/models \
    && ./target/release/preble-modelgen --out /out/models/preble-sim \
    && cp target/release/preble-gateway /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home preble
COPY --from=build /out/preble-gateway /usr/local/bin/preble-gateway
COPY --from=build /out/models /opt/preble/models
USER preble
ENV PREBLE_HTTP_ADDR=0.0.0.0:8000 \
    PREBLE_MODEL_DIRS=/opt/preble/models/preble-sim \
    PREBLE_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=5 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["/usr/local/bin/preble-gateway"]
