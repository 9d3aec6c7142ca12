"""The model: config, packed batch, encoder, pretraining decoder, heads, losses, checkpoints."""
