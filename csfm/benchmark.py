"""``python -m csfm.benchmark`` (also ``csfm-benchmark``): the command; the work is in ``csfm.benchmarks.cinc2017.harness``."""
from csfm.benchmarks.cinc2017.harness import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
