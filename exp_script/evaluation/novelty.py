"""Memorization / novelty: are generated cells new, or copies of training cells?

In the evaluation's PCA space (top variable genes, z-scored; fitted on the training cells) every cell's
distance to its nearest training cell is measured (scikit-learn ``NearestNeighbors``). Held-out real
cells, which the model never saw, define what "new" looks like:

* ``distance_ratio``: median nearest-training distance of the compared cells / that of the held-out
  reference cells (1 for fresh real cells; 0 for exact copies);
* ``fraction_closer``: share of compared cells closer to a training cell than the 5th percentile of the
  held-out-to-train distances (0.05 for fresh real cells; 1 for copies).

Pass: ``fraction_closer`` at most ``PASS_FRACTION`` (twice what held-out cells show). A memorizer fails.
"""
import numpy as np
from sklearn.neighbors import NearestNeighbors

PERCENTILE = 5.0
PASS_FRACTION = 2 * PERCENTILE / 100.0


def nearest_distances(train_embedding, embedding):
    model = NearestNeighbors(n_neighbors=1).fit(train_embedding)
    return model.kneighbors(embedding, return_distance=True)[0][:, 0]


def novelty(train_embedding, reference_embedding, compared):
    """{section: figures} for each compared embedding, against the held-out reference's distances."""
    reference = nearest_distances(train_embedding, reference_embedding)
    threshold = float(np.percentile(reference, PERCENTILE))
    reference_median = float(np.median(reference))
    results = {"heldout_median_distance": reference_median, "threshold_distance": threshold,
               "percentile": PERCENTILE, "pass_fraction": PASS_FRACTION, "sections": {}}
    for section, embedding in compared.items():
        if len(embedding) == 0:
            continue
        distances = nearest_distances(train_embedding, embedding)
        median = float(np.median(distances))
        fraction = float(np.mean(distances < threshold))
        results["sections"][section] = {
            "median_distance": median,
            "distance_ratio": median / reference_median if reference_median > 0 else float("nan"),
            "fraction_closer": fraction,
            "passes": bool(fraction <= PASS_FRACTION),
        }
    return results
