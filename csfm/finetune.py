"""``python -m csfm.finetune`` (also ``csfm-finetune``): the command; the work is in ``csfm.evaluation.finetune``."""
from csfm.evaluation.finetune import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
