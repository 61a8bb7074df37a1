"""The router: session affinity, least-loaded routing and broadcast over replicas."""
