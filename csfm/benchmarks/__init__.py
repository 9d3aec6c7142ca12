"""Applications of the library that measure models on public data."""
