r"""The scVI peer baseline: scVI trained on the training split, used as a generator, written as our sampler writes.

    .venv-peer/bin/python benchmarks/peer_scvi.py --train checkpoint/peer/baron/split/train.h5ad \
        --label_key cell_type1 --out checkpoint/peer/baron/seed0 --seed 0 --max_epochs 300 --threads 1

Needs scvi-tools (the optional environment of `make bench-peer-env`, .venv-peer; docs/peer_baseline.md).

1. Trains ``scvi.model.SCVI`` (gene_likelihood nb, n_latent 30, every other setting scvi-tools' default: 1 layer of
   128 units, gene dispersion, observed library sizes, 90/10 train/validation split, no early stopping) on the raw
   counts of the training cells (X, or --layer), seeded with ``scvi.settings.seed``.
2. Generates: per cell type, a Gaussian is fitted to the latent posterior means (``get_latent_representation``)
   of that type's training cells: mean and full covariance when the type has at least --min_cells_full cells
   (default 2 x n_latent), else a diagonal one (per-dimension variance; one cell: its latent only). As many
   latents as the type has training cells are drawn (--match_counts True), each decoded by the model's
   generative network (``module.generative``) at a library size drawn from that type's training library sizes,
   and counts are drawn from the decoder's negative binomial (``px.sample()``: rate x theta, Gamma-Poisson).
3. Posterior predictive of the training cells (``model.posterior_predictive_sample``: each cell encoded, a latent
   drawn from its posterior, decoded at its own library size, counts drawn) — the analogue of decoding our
   training latents.

OUT/generated.h5ad and OUT/posterior_predictive.h5ad have the layout of cell_sample.py's generated.h5ad, so
exp_script/evaluate.py reads them as it reads ours (its defaults): X the log-normalized counts
(log1p(count / cell total x 10,000), CSR float32), layers['counts'] the drawn counts (CSR float32), obs[LABEL_KEY]
the cell type, obs['library_size'] (drawn total) and obs['target_library_size'] (the library size asked for),
uns['log1p']. OUT/peer.json records the settings, versions, the training wall time and the Gaussian kind per type;
OUT/model/ the trained scVI model.
"""
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from guided_diffusion.cli import (ArgumentParser, HelpFormatter, UsageError, add_debug_arg, command,  # noqa: E402
                                  positive_int, str2bool)

MISSING_SCVI = "scvi-tools is not installed; run make bench-peer-env"
CHUNK = 1024
RIDGE = 1e-6  # added to the diagonal of a full covariance (numerical safety of the Cholesky factor)


def import_scvi():
    """scvi, or a one-line UsageError when it is not installed (the project's own .venv lacks it on purpose)."""
    try:
        import scvi
    except ModuleNotFoundError as error:
        if error.name == "scvi" or (error.name or "").startswith("scvi."):
            raise UsageError(MISSING_SCVI) from None
        raise
    return scvi


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--train", required=True, help="training cells (.h5ad with raw counts in X or --layer)")
    parser.add_argument("--label_key", default="cell_type1", help="obs column with the cell type")
    parser.add_argument("--layer", default="", help="layer holding the raw counts (default: X)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="scvi.settings.seed: training, the Gaussians' draws, counts")
    parser.add_argument("--max_epochs", type=positive_int, default=300)
    parser.add_argument("--n_latent", type=positive_int, default=30)
    parser.add_argument("--batch_size", type=positive_int, default=128, help="scvi-tools' default")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch")
    parser.add_argument("--match_counts", type=str2bool, default=True,
                        help="draw as many cells per type as training has (False: --cells_per_type each)")
    parser.add_argument("--cells_per_type", type=positive_int, default=None, help="with --match_counts False")
    parser.add_argument("--min_cells_full", type=positive_int, default=None,
                        help="a type's Gaussian has a full covariance from this many training cells on, else a "
                             "diagonal one (default: 2 x n_latent)")
    parser.add_argument("--posterior_predictive", type=str2bool, default=True,
                        help="also write OUT/posterior_predictive.h5ad")
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    if not args.match_counts and args.cells_per_type is None:
        parser.error("--match_counts False needs --cells_per_type")
    if args.min_cells_full is None:
        args.min_cells_full = 2 * args.n_latent
    return args


def cpu_model():
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_training_cells(path, label_key, layer):
    import anndata
    import numpy as np
    import scipy.sparse as sp

    if not os.path.exists(path):
        raise UsageError(f"--train {path} does not exist")
    adata = anndata.read_h5ad(path)
    if label_key not in adata.obs:
        raise UsageError(f"--label_key {label_key} is not an obs column of {path} "
                         f"({', '.join(map(str, adata.obs.columns[:10]))})")
    if layer and layer not in adata.layers:
        raise UsageError(f"--layer {layer} is not a layer of {path} ({', '.join(adata.layers) or 'none'})")
    counts = adata.layers[layer] if layer else adata.X
    counts = sp.csr_matrix(counts, dtype=np.float32)
    values = counts.data
    if values.size and ((values < 0).any() or not np.allclose(values, np.round(values))):
        raise UsageError(f"{path} ({layer or 'X'}) does not hold raw counts (negative or non-integer values); "
                         f"scVI's negative binomial needs counts: give --layer")
    cells = anndata.AnnData(X=counts, obs=adata.obs[[label_key]].copy(), var=adata.var[[]].copy())
    cells.obs[label_key] = cells.obs[label_key].astype(str)
    return cells


def fit_and_draw(latents, count, min_cells_full, rng):
    """``count`` draws of a Gaussian fitted to ``latents`` (cells x dims); returns (draws, kind)."""
    import numpy as np

    mean = latents.mean(axis=0)
    if len(latents) >= min_cells_full:
        covariance = np.cov(latents, rowvar=False) + RIDGE * np.eye(latents.shape[1])
        factor = np.linalg.cholesky(covariance)
        return mean + rng.standard_normal((count, len(mean))) @ factor.T, "full"
    if len(latents) > 1:
        return mean + rng.standard_normal((count, len(mean))) * latents.std(axis=0, ddof=1), "diagonal"
    return np.repeat(mean[None], count, axis=0), "point"


def draw_counts(model, latents, library_sizes):
    """Counts (CSR float32) of the scVI decoder's negative binomial at ``latents`` and ``library_sizes``."""
    import numpy as np
    import scipy.sparse as sp
    import torch

    module = model.module
    module.eval()
    blocks = []
    with torch.inference_mode():
        for start in range(0, len(latents), CHUNK):
            z = torch.as_tensor(latents[start:start + CHUNK], dtype=torch.float32, device=module.device)
            library = torch.log(torch.as_tensor(library_sizes[start:start + CHUNK], dtype=torch.float32,
                                                device=module.device)).unsqueeze(1)
            batch_index = torch.zeros((len(z), 1), dtype=torch.float32, device=module.device)
            px = module.generative(z=z, library=library, batch_index=batch_index)["px"]
            blocks.append(sp.csr_matrix(px.sample().cpu().numpy().astype(np.float32)))
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, module.n_input), dtype=np.float32)


def write_like_sampler(path, counts, labels, label_key, genes, target_sizes, record):
    """An .h5ad laid out as cell_sample.py's generated.h5ad (X log-normalized, layers['counts'] the counts)."""
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from guided_diffusion.data.normalize import TARGET_SUM, log_normalize
    from guided_diffusion.sampling.writer import SCANPY_LOG1P, write_h5ad

    counts = sp.csr_matrix(counts, dtype=np.float32)
    counts.eliminate_zeros()
    index_dtype = np.int32 if counts.shape[0] * counts.shape[1] < 2 ** 31 else np.int64
    counts.indices, counts.indptr = counts.indices.astype(index_dtype), counts.indptr.astype(index_dtype)
    normalized = log_normalize(counts, TARGET_SUM)
    obs = pd.DataFrame({label_key: pd.Categorical(np.asarray(labels, dtype=str)),
                        "library_size": np.asarray(counts.sum(axis=1), dtype=np.float32).ravel(),
                        "target_library_size": np.asarray(target_sizes, dtype=np.float32)},
                       index=pd.Index([str(i) for i in range(counts.shape[0])]))
    adata = anndata.AnnData(X=normalized, obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene")),
                            layers={"counts": counts}, uns={"log1p": dict(SCANPY_LOG1P), "peer": storable(record)})
    write_h5ad(path, adata)


def storable(record):
    """``record`` as anndata can write it into uns (JSON types, no None)."""
    if isinstance(record, dict):
        return {str(k): storable(v) for k, v in record.items() if v is not None}
    return record if isinstance(record, (bool, int, float, str)) else str(record)


def posterior_predictive_counts(model, adata, batch_size):
    import numpy as np
    import scipy.sparse as sp

    drawn = model.posterior_predictive_sample(adata, n_samples=1, batch_size=batch_size)
    if hasattr(drawn, "to_scipy_sparse"):
        drawn = drawn.to_scipy_sparse()
    elif hasattr(drawn, "todense"):
        drawn = drawn.todense()
    return sp.csr_matrix(drawn, dtype=np.float32)


@command
def main(argv=None):
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    scvi = import_scvi()
    import numpy as np

    os.makedirs(args.out, exist_ok=True)
    adata = read_training_cells(args.train, args.label_key, args.layer)
    scvi.settings.seed = args.seed
    scvi.settings.dl_num_workers = 0
    scvi.settings.verbosity = 30  # warnings
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata, n_latent=args.n_latent, gene_likelihood="nb")
    start = time.perf_counter()
    model.train(max_epochs=args.max_epochs, accelerator="cpu", devices=1, batch_size=args.batch_size,
                enable_progress_bar=False)
    train_seconds = time.perf_counter() - start
    model.save(os.path.join(args.out, "model"), overwrite=True)
    history = {key: float(model.history[key].iloc[-1, 0]) for key in ("elbo_train", "elbo_validation")
               if key in model.history}

    # the generator: per type a Gaussian on the training cells' latent posterior means
    start = time.perf_counter()
    means = model.get_latent_representation(adata, give_mean=True)
    labels = adata.obs[args.label_key].to_numpy(dtype=str)
    library = np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
    rng = np.random.default_rng([args.seed, 29])
    latents, drawn_labels, sizes, kinds = [], [], [], {}
    for label in sorted(set(labels)):
        members = labels == label
        count = int(members.sum()) if args.match_counts else args.cells_per_type
        draws, kinds[label] = fit_and_draw(means[members], count, args.min_cells_full, rng)
        type_library = library[members]
        type_library = type_library[type_library > 0] if (type_library > 0).any() else np.ones(1)
        latents.append(draws)
        sizes.append(rng.choice(type_library, size=count, replace=True))
        drawn_labels += [label] * count
    latents, sizes = np.concatenate(latents).astype(np.float32), np.concatenate(sizes)
    counts = draw_counts(model, latents, sizes)
    generate_seconds = time.perf_counter() - start
    record = {"method": "scVI", "scvi_tools": scvi.__version__, "torch": str(torch.__version__), "seed": args.seed,
              "train": os.path.abspath(args.train), "label_key": args.label_key, "layer": args.layer or "X",
              "cells": int(adata.n_obs), "genes": int(adata.n_vars), "max_epochs": args.max_epochs,
              "epochs_run": int(len(model.history["elbo_train"])) if "elbo_train" in model.history else None,
              "n_latent": args.n_latent, "gene_likelihood": "nb", "batch_size": args.batch_size,
              "threads": args.threads, "cpu": cpu_model(), "train_seconds": round(train_seconds, 1),
              "generate_seconds": round(generate_seconds, 1), "final_elbo": history,
              "min_cells_full": args.min_cells_full, "match_counts": args.match_counts,
              "generated_cells": int(len(latents)), "gaussian": kinds,
              "generator": "per type: Gaussian on the latent posterior means of its training cells; library sizes "
                           "drawn from its training library sizes; counts from the decoder's negative binomial"}
    write_like_sampler(os.path.join(args.out, "generated.h5ad"), counts, drawn_labels, args.label_key,
                       list(adata.var_names), sizes, {k: v for k, v in record.items() if k != "gaussian"})
    if args.posterior_predictive:
        start = time.perf_counter()
        predictive = posterior_predictive_counts(model, adata, args.batch_size)
        record["posterior_predictive_seconds"] = round(time.perf_counter() - start, 1)
        write_like_sampler(os.path.join(args.out, "posterior_predictive.h5ad"), predictive, labels, args.label_key,
                           list(adata.var_names), library, {"method": "scVI posterior predictive",
                                                            "seed": args.seed})
    with open(os.path.join(args.out, "peer.json"), "w") as stream:
        json.dump(record, stream, indent=2)
    print(f"scVI: trained {record['epochs_run']} epochs in {train_seconds:.0f} s on {args.threads} thread(s); "
          f"{len(latents)} cells generated in {generate_seconds:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
