"""Records in: readers, lead contract, sources, demo data, preprocessing, tokenizer, windows, splits."""
