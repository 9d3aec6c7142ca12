"""``python -m csfm.predict`` (also ``csfm-predict``): the command; the work is in ``csfm.evaluation.predict``."""
from csfm.evaluation.predict import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
