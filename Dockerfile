# The kubeforge control-plane image: the operator and the routers run it
# (`kubeforge operator`, `python -m kubeforge.router`). `make images` builds it (images/build.sh).
#
# The wheel, with the router's Rust relay, is built in a rust stage (WHEELS=build, the default),
# or, where no Rust image can be pulled, built outside and taken from ./dist (WHEELS=context).
# The image itself carries only that wheel, no compiler. The bases are build args, so a machine
# without registry access passes local ones. A CA bundle for pip, when the network needs one, is
# a build secret (`--secret id=ca,src=...`): it is mounted for the RUN that uses it and never
# lands in a layer.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG RUST_IMAGE=rust:1-slim-bookworm
ARG WHEELS=build

FROM ${RUST_IMAGE} AS rust
FROM ${PYTHON_IMAGE} AS wheels-build
COPY --from=rust /usr/local/cargo /usr/local/cargo
COPY --from=rust /usr/local/rustup /usr/local/rustup
ENV CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup PATH=/usr/local/cargo/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubeforge ./kubeforge
COPY relay ./relay
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; fi; \
    pip wheel --no-cache-dir --no-deps -w /wheels .

FROM scratch AS wheels-context
COPY dist/kubeforge-*.whl /wheels/

FROM wheels-${WHEELS} AS wheels

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# The wheel stays in the image: replica_image/Dockerfile installs the same one from here.
COPY --from=wheels /wheels /opt/kubeforge/wheels
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install /opt/kubeforge/wheels/*.whl \
    && useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin kubeforge

USER 1000
EXPOSE 8080 8081
# No ENTRYPOINT on purpose: every pod the operator writes names its command explicitly.
CMD ["kubeforge", "--help"]
