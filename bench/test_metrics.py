"""Bootstrap CI of AUROC, 1000 resamples of 5000 rows: the vectorised bootstrap vs a loop of
scikit-learn's roc_auc_score over the same resamples, same run."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from csfm.evaluation.metrics import auroc, bootstrap_ci


def test_bootstrap_auroc(side_by_side):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5000)
    score = y + rng.normal(0, 1.5, 5000)
    rows = np.random.default_rng(1).integers(0, 5000, (1000, 5000))

    def sklearn_loop():
        np.percentile([roc_auc_score(y[r], score[r]) for r in rows], [2.5, 97.5])

    side_by_side("bootstrap AUROC CI", "1000 resamples x 5000 rows", {"sklearn loop": sklearn_loop},
                 {"csfm.evaluation.metrics.bootstrap_ci": lambda: bootstrap_ci(auroc, y, score, n_boot=1000)}, rounds=3)
