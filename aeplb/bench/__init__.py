"""``python -m aeplb.bench``: bandwidth and event-loop stall per backend, against raw p2p and
a synchronous baseline, measured side by side in one run."""
