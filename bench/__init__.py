"""GPU latency benchmark of the debias step inside each patched method (issue: overhead ≤ 0.2 % of prefill)."""
