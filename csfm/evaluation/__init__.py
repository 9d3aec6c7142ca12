"""Downstream: embeddings, linear probes, fine-tuning, metrics."""
