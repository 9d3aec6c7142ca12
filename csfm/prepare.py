"""``python -m csfm.prepare`` (also ``csfm-prepare``): the command; the work is in ``csfm.data.prepare_shards``."""
from csfm.data.prepare_shards import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
