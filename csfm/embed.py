"""``python -m csfm.embed`` (also ``csfm-embed``): the command; the work is in ``csfm.evaluation.embedding``."""
from csfm.evaluation.embedding import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
