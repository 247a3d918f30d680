# umeng-push-gateway container image.
#
#   docker build -t umeng-push-gateway .
#   docker run --rm -p 8080:8080 umeng-push-gateway          # demo mode, SQLite in /app/data
#
# Base images are pinned by tag so that a rebuild uses the same toolchain (rustc 1.95, as
# in CI) and the same Debian release for building and running: the binary links against
# the builder's glibc, so both stages must be Debian 12 (bookworm).
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------- builder
FROM ${RUST_IMAGE} AS builder
WORKDIR /build

# Dependencies first, in their own layer: build the dependency graph against an empty
# crate, so that editing src/ does not recompile the ~300 dependencies.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# Then the crate itself. The migrations are embedded in the binary at compile time
# (sqlx::migrate!), so they are needed here and not at run time. COPY keeps the files'
# modification times, which can be older than the dummy build: touch them so cargo sees
# the real sources as changed.
COPY build.rs ./
COPY src ./src
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && strip target/release/umeng-push-gateway \
 && target/release/umeng-push-gateway --version

# The runtime image has no shell, so the writable SQLite directory is made here and copied
# over with its owner (65532 = the distroless "nonroot" user).
RUN mkdir -p /out/data

# ---------------------------------------------------------------------------- runtime
# distroless/cc: glibc, libgcc and CA certificates, no shell, no package manager. The
# :nonroot variant already runs as uid/gid 65532.
FROM ${RUNTIME_IMAGE}

LABEL org.opencontainers.image.title="umeng-push-gateway" \
      org.opencontainers.image.description="HTTP gateway in front of Umeng U-Push" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

COPY --from=builder /build/target/release/umeng-push-gateway /usr/local/bin/umeng-push-gateway
# default.toml documents every setting; example.toml is a production-shaped starting point.
COPY config/ /app/config/
# The default database is sqlite://data/umeng-push-gateway.db, relative to WORKDIR: this
# directory must be writable by the runtime user. Mount a volume here to keep the data.
COPY --from=builder --chown=65532:65532 /out/data /app/data
WORKDIR /app

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532

# The image listens on all interfaces; the binary's own default is loopback only.
ENV UMENG_GATEWAY_SERVER__LISTEN=0.0.0.0:8080
EXPOSE 8080

# `healthcheck` reads the same configuration as `serve` (UMENG_GATEWAY_CONFIG and the
# UMENG_GATEWAY_* variables) to find the port, and probes /readyz. Pass the config file
# with UMENG_GATEWAY_CONFIG rather than --config so that this probe sees it too.
HEALTHCHECK --interval=15s --timeout=6s --start-period=20s --retries=3 \
  CMD ["umeng-push-gateway", "healthcheck"]

ENTRYPOINT ["umeng-push-gateway"]
CMD ["serve"]
