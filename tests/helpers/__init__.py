"""Code that exists only for the tests and the benchmarks (not part of the installed package)."""
