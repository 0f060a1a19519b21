"""Analysis: the run-directory reader, results, statistics, report and sweep tables (no runner imports)."""
