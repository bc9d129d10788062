"""Results tooling: log checks, scores, submission packages, plots, detection pictures."""
