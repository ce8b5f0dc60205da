"""`fedpriv bench`: every performance number, one piece per module, written as JSON and BENCHMARKS.md."""
