"""pydist benchmarks: ./bench/run.sh (see docs/benchmarks.md)."""
