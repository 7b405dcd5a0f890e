"""Shared preparation: label-stratified splits and subsamples, and the evaluation's feature space
(top variable genes, z-scored, on a PCA)."""
import numpy as np
from sklearn.decomposition import PCA

from guided_diffusion.data.variable_genes import rank_variable_genes


def subsample_rows(n, count, rng):
    """Sorted indices of at most ``count`` of ``n`` rows, drawn without replacement (all if fewer)."""
    if n <= count:
        return np.arange(n)
    return np.sort(rng.choice(n, count, replace=False))


def split_real(labels, seed):
    """Two halves of the real cells, stratified by label (odd counts give A the extra cell)."""
    rng = np.random.default_rng([seed, 2])
    reference, control = [], []
    for label in sorted(set(labels)):
        cells = rng.permutation(np.flatnonzero(labels == label))
        half = (len(cells) + 1) // 2
        reference.append(cells[:half])
        control.append(cells[half:])
    return np.sort(np.concatenate(reference)), np.sort(np.concatenate(control))


def stratified_subsample(labels, count, rng):
    """Sorted indices of ``count`` cells (all if there are fewer) keeping the label proportions:
    each label gets its share rounded down, the cells left over go to the largest remainders."""
    labels = np.asarray(labels)
    if len(labels) <= count:
        return np.arange(len(labels))
    names, sizes = np.unique(labels, return_counts=True)
    shares = sizes * (count / len(labels))
    quotas = np.floor(shares).astype(int)
    quotas[np.argsort(-(shares - quotas), kind="stable")[:count - quotas.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == name), quota, replace=False) for name, quota in zip(names, quotas)]
    return np.sort(np.concatenate(chosen))


def balanced_rows(reference_labels, compared_labels, rng):
    """Row indices of both sides cut to the smaller side's size, each keeping its label proportions."""
    size = min(len(reference_labels), len(compared_labels))
    return (stratified_subsample(reference_labels, size, rng), stratified_subsample(compared_labels, size, rng))


class FeatureSpace:
    """Top variable genes of ``expression``, z-scored (clipped at 10), projected on its PCA."""

    def __init__(self, expression, genes, n_hvg, n_pcs, seed):
        gene_order = rank_variable_genes(expression, genes)
        self.genes = np.sort(gene_order[:min(n_hvg, len(gene_order))])
        selected = expression[:, self.genes]
        self.mean = selected.mean(axis=0)
        scale = selected.std(axis=0)
        scale[scale == 0] = 1.0
        self.scale = scale
        n_components = int(max(1, min(n_pcs, selected.shape[0] - 1, selected.shape[1])))
        self.pca = PCA(n_components=n_components, svd_solver="randomized", random_state=seed)
        self.pca.fit(self._standardize(selected))

    def _standardize(self, selected):
        return np.clip((selected - self.mean) / self.scale, -10.0, 10.0)

    def embed(self, expression):
        return self.pca.transform(self._standardize(expression[:, self.genes])).astype(np.float32)
