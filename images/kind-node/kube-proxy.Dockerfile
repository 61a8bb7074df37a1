# kube-proxy's image for the offline kind node: it programs Service routing with iptables, so it
# carries Debian's iptables (nf_tables, as the node's) and conntrack beside the static binary.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       iptables conntrack >/dev/null \
    && rm -rf /var/lib/apt/lists/*
COPY kube-proxy /usr/local/bin/kube-proxy
