"""``python -m csfm.probe`` (also ``csfm-probe``): the command; the work is in ``csfm.evaluation.probe``."""
from csfm.evaluation.probe import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
