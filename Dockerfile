# The `tidemark` image of docker-compose.yml: the binary (every subcommand)
# and the built dashboard.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The dashboard is installed and built as on any machine (scripts/setup.sh,
# whose `npm install` copes with the optional platform packages that npm
# leaves out of the lock file, where a clean install trips over them).
RUN cargo build --release --locked --bin tidemark \
 && scripts/setup.sh --web-only

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tidemark /usr/local/bin/tidemark
COPY --from=build /src/dashboards/web/dist /usr/share/tidemark/web
