# A replica image as a user builds one: FROM the replica base, with actor code copied in.
# (Here the repo's examples/, which the image tests and the kind lane run.)
ARG REPLICA_IMAGE=kubeforge-replica:0.1.0
FROM ${REPLICA_IMAGE}
COPY examples/ /app/examples/
