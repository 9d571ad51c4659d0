"""Evaluations of aligned models: each returns a result dict {"eval", "metrics", "counts", ...}."""
