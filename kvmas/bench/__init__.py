"""Benchmarks: accuracy (this package's ``accuracy``) and efficiency (``efficiency``) of kvmas methods."""
