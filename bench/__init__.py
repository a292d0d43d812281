"""pgpush's benchmark harness: `python -m bench run <scenario>` (see bench/RESULTS.md)."""
