# The kubeforge control-plane image: the operator and the routers run it
# (`kubeforge operator`, `python -m kubeforge.router`). Not built in this repo's CI, which has no
# Docker engine; the e2e tier runs the same commands as processes.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/kubeforge
COPY pyproject.toml README.md ./
COPY kubeforge ./kubeforge
RUN pip install . && useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin kubeforge

USER 1000
EXPOSE 8080 8081
# No ENTRYPOINT on purpose: every pod the operator writes names its command explicitly.
CMD ["kubeforge", "--help"]
