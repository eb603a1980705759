# preble-scheduler: built in the Rust image, run in slim Debian as a non-root user.
# Build from the repository root: docker build -f docker/scheduler.Dockerfile .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p preble-scheduler -p preble-modelgen \
    && mkdir -p /out/models \
    && ./target/release/preble-modelgen --out /out/models/preble-sim \
    && cp target/release/preble-scheduler /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home preble
COPY --from=build /out/preble-scheduler /usr/local/bin/preble-scheduler
COPY --from=build /out/models /opt/preble/models
USER preble
ENV PREBLE_HTTP_ADDR=0.0.0.0:9000 \
    PREBLE_LOG_FORMAT=json
EXPOSE 9000
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=5 \
    CMD curl -fsS http://127.0.0.1:9000/health || exit 1
ENTRYPOINT ["/usr/local/bin/preble-scheduler"]
