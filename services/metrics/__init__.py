"""Prometheus metrics: what is exported (``catalog``) and the recorders of each stage."""
