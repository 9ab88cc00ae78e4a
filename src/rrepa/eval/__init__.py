"""Evaluation: sample metrics (FID, sFID, IS, precision / recall) and their feature networks, reference
statistics, the training-free classifiers, linear probes and bits/dim."""
