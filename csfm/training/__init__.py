"""Pretraining: optimizer groups, precision, the training loop."""
