"""csfm: cardiac sensing foundation model for ECG and PPG (model, data, training, embeddings)."""
__version__ = "0.1.0"
