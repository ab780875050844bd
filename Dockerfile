# bitsd in a container: build with the Rust image, run on slim Debian as an unprivileged user.
#   docker build -t bitsd .
#   docker run -d -p 8080:8080 -v bitsd-data:/data bitsd
# Configuration: mount a file and pass --config, e.g.
#   docker run -d -p 8443:8080 -v bitsd-data:/data -v /etc/bitsd:/etc/bitsd:ro bitsd --config /etc/bitsd/bitsd.toml
# The environment below sets listen, admin listener and data directory; like flags, it wins
# over the file.

FROM rust:1.89-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p bitsd \
 && install -m 0755 target/release/bitsd /usr/local/bin/bitsd

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 bitsd \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --shell /usr/sbin/nologin bitsd \
 && mkdir -p /data \
 && chown bitsd:bitsd /data
COPY --from=build /usr/local/bin/bitsd /usr/local/bin/bitsd
USER 10001:10001
WORKDIR /data
ENV BITSD_LISTEN=0.0.0.0:8080 \
    BITSD_ADMIN_LISTEN=0.0.0.0:8081 \
    BITSD_DATA_DIR=/data
VOLUME ["/data"]
# 8080: BITS; 8081: admin (sessions, metrics, health): keep it unpublished.
EXPOSE 8080 8081
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
  CMD ["bitsd", "healthcheck", "--admin", "127.0.0.1:8081"]
# SIGTERM (docker stop) lets requests in flight finish and flushes the store before exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["bitsd"]
