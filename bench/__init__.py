"""ipshift benchmarks: each measures ipshift and its baseline in the same run."""
