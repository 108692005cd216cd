"""`rpp benchmark`: compare prompt methods, trained policies and classic recommenders on the same test users.

    from rpp.benchmark import run_benchmark
    report_dir = run_benchmark(load_config("experiments/benchmark-ml100k.yaml"))

New methods register a factory under a name (``rpp.benchmark.methods.register``) and are then selectable in
``benchmark.methods``.
"""
from rpp.benchmark.methods import (
    METHODS, BenchContext, BenchmarkError, Method, build_methods, register,
)
from rpp.benchmark.runner import MeteredRanker, run_benchmark

__all__ = ["METHODS", "BenchContext", "BenchmarkError", "Method", "MeteredRanker", "build_methods", "register",
           "run_benchmark"]
