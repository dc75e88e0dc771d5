"""`perfxlm bench ...`: benchmarks that print our numbers beside a reference run in the same process."""
