"""Training: the run (``captioner train``), the epoch loop, the objectives (teacher forcing,
self-critical), validation, weight averaging, and the run's logs."""
