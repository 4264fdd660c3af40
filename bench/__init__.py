"""The benchmarks: `python -m bench MODE [options]`, one module per mode (see __main__.py)."""
