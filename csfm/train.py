"""``python -m csfm.train`` (also ``csfm-train``): the command; the work is in ``csfm.training.loop``."""
from csfm.training.loop import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
