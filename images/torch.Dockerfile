# A Python base with torch, for replica images of actors that use it (`make images` builds the
# examples image on it). PyPI's wheel is the CUDA build: it runs on CPU (gloo) where no GPU is,
# and on NVIDIA GPUs unchanged. About 5 GB; built once per torch version and kept by the engine,
# so code changes rebuild only the layers above it. For a GPU cluster a pytorch/pytorch image
# serves as well (replica_image/Dockerfile, BASE).
#
# The version comes from pyproject.toml's `dev` extra (images/build.sh reads it): the tests on
# the process node and the images on kind run one torch. pip's downloads stay in a build cache,
# never in a layer; the CA bundle, when the network needs one, is a build secret.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG TORCH_VERSION
RUN --mount=type=secret,id=ca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    test -n "$TORCH_VERSION" && pip install --quiet "torch==${TORCH_VERSION}" \
    && python -c "import torch, torch.distributed as d; assert d.is_gloo_available()"
