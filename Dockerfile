# The kubeforge control-plane image: the operator and the routers run it
# (`kubeforge operator`, `python -m kubeforge.router`). Not built in this repo's CI, which has no
# Docker engine; the e2e tier runs the same commands as processes.
#
# The build stage compiles the router's native relay (relay/, Rust) into a wheel; the image
# itself carries only that wheel, no compiler.
FROM rust:1-slim-bookworm AS rust
FROM python:3.11-slim-bookworm AS build
COPY --from=rust /usr/local/cargo /usr/local/cargo
COPY --from=rust /usr/local/rustup /usr/local/rustup
ENV CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup PATH=/usr/local/cargo/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubeforge ./kubeforge
COPY relay ./relay
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# The wheel stays in the image: replica_image/Dockerfile installs the same one from here.
COPY --from=build /wheels /opt/kubeforge/wheels
RUN pip install /opt/kubeforge/wheels/*.whl \
    && useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin kubeforge

USER 1000
EXPOSE 8080 8081
# No ENTRYPOINT on purpose: every pod the operator writes names its command explicitly.
CMD ["kubeforge", "--help"]
