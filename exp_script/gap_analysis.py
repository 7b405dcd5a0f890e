r"""Where does the gap between generated and held-out real cells come from? A measured breakdown.

    python exp_script/gap_analysis.py --train checkpoint/demo/latest/split/train.h5ad \
        --heldout checkpoint/demo/latest/split/heldout.h5ad \
        --vae_path checkpoint/demo/latest/autoencoder/model_seed=0_step=600.pt \
        --samples checkpoint/demo/latest/samples --out checkpoint/demo/latest/gap

Every comparison is against the held-out real cells, with the evaluation's two-sample metrics (kNN and
random-forest AUC on out-of-fold predictions, 0.5 = indistinguishable), beside the positive control
(the training cells):
  (a) expression: the training cells (control), the autoencoder's reconstructions of the held-out cells
      (drawn counts and decoded means: its ceiling), of the training cells (what a perfect latent model
      would give through this decoder) and the generated cells;
  (b) latents: the generated latents (the sampler's .npy files) vs the encoded held-out latents, beside the
      encoded training latents; per-dimension mean / variance and the latent norms;
  (c) observation model: library sizes, per-cell and per-gene zero fraction, per-gene dispersion;
  (d) per label: the cell counts and the kNN AUCs of (a) and (b) within each label.
Writes OUT/gap_analysis.json and OUT/gap_analysis.md (atomically) and the reconstructions under
OUT/reconstructions/.
"""
import argparse
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from exp_script.evaluation import metrics, reconstruction
from exp_script.evaluation.controls import log_normalize
from exp_script.evaluation.gap_analysis_report import markdown_report
from exp_script.evaluation.inputs import CellSet, json_ready, read_set
from guided_diffusion.core.atomic import atomic_output
from guided_diffusion.cli import ArgumentParser, add_debug_arg, add_device_arg, command, str2bool
from guided_diffusion.core.atomic import check_writable_dir
from guided_diffusion.core.errors import UsageError
from guided_diffusion.core.device import resolve_device
from guided_diffusion.data import DEFAULT_LABEL_KEY, TARGET_SUM, load_dataset
from guided_diffusion.sampling.writer import write_decoded_h5ad
from guided_diffusion.cli import add_threads_arg
from guided_diffusion.core.threads import apply_threads


@dataclass
class GapSettings:
    train: str
    heldout: str
    vae_path: str
    samples: str
    out: str
    label_key: str = DEFAULT_LABEL_KEY
    seed: int = 0
    random_forest: bool = True
    device: str = "auto"
    progress: bool = True


def generated_latents(samples_dir, n_cells):
    """The sampler's per-condition latent files, concatenated in the manifest's order (the order of the
    cells in generated.h5ad)."""
    manifest_path = os.path.join(samples_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise UsageError(f"{samples_dir} has no manifest.json: not a complete cell_sample.py output folder")
    with open(manifest_path) as stream:
        names = [name for name in json.load(stream)["files"] if name.endswith(".npy")]
    latents = np.concatenate([np.load(os.path.join(samples_dir, name)) for name in names]) if names else None
    if latents is None or len(latents) != n_cells:
        raise UsageError(f"{samples_dir}: the latent files hold {0 if latents is None else len(latents)} cells but "
                         f"generated.h5ad {n_cells}")
    return latents


def reconstructions(settings, progress):
    """Reconstruct the held-out cells (counts and means) and the training cells (counts) as
    exp_script/reconstruct.py does; returns {name: path}."""
    from VAE.VAE_model import load_autoencoder

    folder = os.path.join(settings.out, "reconstructions")
    os.makedirs(folder, exist_ok=True)
    jobs = {"heldout_counts": (settings.heldout, "counts"), "heldout_means": (settings.heldout, "mean"),
            "train_counts": (settings.train, "counts")}
    paths = {}
    for name, (source, observation) in tqdm(jobs.items(), desc="reconstruct", disable=not progress):
        autoencoder, _ = load_autoencoder(settings.vae_path, device=resolve_device(settings.device))
        dataset = load_dataset(source, label_keys=[settings.label_key], backed="auto")
        paths[name] = reconstruction.reconstruct(autoencoder, dataset, os.path.join(folder, f"{name}.h5ad"),
                                                 observation=observation, seed=settings.seed, progress=False,
                                                 data_path=source, vae_path=settings.vae_path)
    return paths


def load_inputs(settings, progress):
    """(sets by name, genes): the held-out, training and generated cells and the reconstructions."""
    sources = {"heldout": settings.heldout, "train": settings.train,
               "generated": os.path.join(settings.samples, "generated.h5ad")}
    sources.update({f"reconstructed_{name}": path for name, path in reconstructions(settings, progress).items()})
    sets, genes = {}, None
    for name, path in tqdm(sources.items(), desc="read", disable=not progress):
        sets[name], found = read_set(path, settings.label_key, name)
        if genes is not None and found != genes:
            raise UsageError(f"{path} ({name}) has other genes than {settings.heldout}: the analysis needs the "
                             f"autoencoder's genes in every file")
        genes = found
    return sets, genes


EXPRESSION_SETS = {"train": "training cells (positive control)",
                   "reconstructed_heldout_counts": "held-out cells reconstructed, drawn counts (autoencoder ceiling)",
                   "reconstructed_heldout_means": "held-out cells reconstructed, decoded means",
                   "reconstructed_train_counts": "training cells reconstructed, drawn counts (perfect latent model)",
                   "reconstructed_heldout_poisson": "held-out cells reconstructed, Poisson counts around the "
                                                    "decoded means (no NB dispersion)",
                   "generated": "generated cells",
                   "generated_on_sphere": "generated latents projected onto the unit sphere, decoded, drawn counts"}
OBSERVATION_SETS = ("train", "reconstructed_heldout_counts", "reconstructed_heldout_poisson",
                    "reconstructed_train_counts", "generated", "generated_on_sphere")


def encoded_latents(settings, autoencoder, sets, progress):
    """{name: latents}: the training and held-out cells encoded, the generated latents as sampled and
    projected onto the unit sphere (where the default encoder puts every real cell)."""
    latents = {}
    for name, path in (("heldout", settings.heldout), ("train", settings.train)):
        dataset = load_dataset(path, label_keys=[settings.label_key])
        try:
            autoencoder.check_dataset(dataset)
            latents[name] = autoencoder.encode_dataset(dataset, progress=progress)
        finally:
            dataset.close()
    latents["generated"] = generated_latents(settings.samples, len(sets["generated"].labels))
    if autoencoder.model.latent_on_sphere:  # a variational encoder's or an unnormalized latent is not on a sphere
        norms = np.linalg.norm(latents["generated"], axis=1, keepdims=True)
        latents["generated_on_sphere"] = (latents["generated"] / np.maximum(norms, 1e-12)).astype(np.float32)
    return latents


def decode_on_sphere(settings, autoencoder, latents, progress):
    """The generated latents projected onto the unit sphere, decoded with the sampler's writer and the
    generated cells' own target library sizes (drawn counts); returns the output path."""
    from anndata import read_h5ad

    generated = read_h5ad(os.path.join(settings.samples, "generated.h5ad"), backed="r")
    try:
        obs = generated.obs[[settings.label_key]].copy()
        library_sizes = generated.obs["target_library_size"].to_numpy(np.float64)
    finally:
        generated.file.close()
    path = os.path.join(settings.out, "reconstructions", "generated_on_sphere.h5ad")
    write_decoded_h5ad(path, autoencoder, latents, obs, {"cfdiffusion": {"observation": "counts"}},
                       progress=progress, library_sizes=library_sizes, seed=settings.seed)
    return path


def poisson_from_means(means, totals, seed):
    """Poisson counts around decoded mean expression (log1p of share x TARGET_SUM) at the given library
    sizes: the observation model without the negative binomial's extra dispersion."""
    shares = np.expm1(np.asarray(means, dtype=np.float64)) / TARGET_SUM
    shares /= np.maximum(shares.sum(axis=1, keepdims=True), 1e-12)
    counts = np.random.default_rng([seed, 17]).poisson(shares * np.asarray(totals, dtype=np.float64)[:, None])
    return counts.astype(np.float32)


def latent_section(settings, sets, latents, progress):
    """Generated latents (as sampled and on the sphere) vs the encoded held-out latents, beside the encoded
    training latents; and generated vs training latents."""
    reference = latents["heldout"]
    section = {}
    for name in tqdm([n for n in ("train", "generated", "generated_on_sphere") if n in latents], desc="latent space",
                     disable=not progress):
        labels = sets["generated" if name.startswith("generated") else name].labels
        section[name] = metrics.two_sample(reference, sets["heldout"].labels, latents[name], labels,
                                           seed=settings.seed, use_rf=settings.random_forest)
        section[name]["moments"] = metrics.latent_moments(reference, latents[name])
    section["generated_vs_train"] = metrics.two_sample(latents["train"], sets["train"].labels, latents["generated"],
                                                       sets["generated"].labels, seed=settings.seed,
                                                       use_rf=settings.random_forest)
    section["generated_vs_train"]["moments"] = metrics.latent_moments(latents["train"], latents["generated"])
    section["heldout_norm"] = metrics.quantiles(np.linalg.norm(reference, axis=1))
    return section


def per_label_table(sets, expression, latent):
    """One row per label: cell counts and the within-label kNN AUCs of every comparison."""
    labels = sorted(set(sets["heldout"].labels.tolist()) | set(sets["train"].labels.tolist()))
    rows = []
    for label in labels:
        row = {"label": label, **{f"n_{name}": int((sets[name].labels == label).sum())
                                  for name in ("train", "heldout", "generated")}}
        for name, result in expression.items():
            row[f"expression_{name}_knn_auc"] = result["per_label"].get(label, {}).get("knn_auc", float("nan"))
        for name in [n for n in ("train", "generated", "generated_on_sphere") if n in latent]:
            row[f"latent_{name}_knn_auc"] = latent[name]["per_label"].get(label, {}).get("knn_auc", float("nan"))
        rows.append(row)
    return rows


def check_inputs(settings):
    """Refuse missing inputs before any work is done."""
    files = {"--train": settings.train, "--heldout": settings.heldout, "--vae_path": settings.vae_path,
             "--samples": os.path.join(settings.samples, "generated.h5ad")}
    for flag, path in files.items():
        if not os.path.isfile(path):
            raise UsageError(f"{flag}: {path} does not exist" + (" (not a cell_sample.py output folder)"
                                                                 if flag == "--samples" else ""))
    if not os.path.isfile(os.path.join(settings.samples, "manifest.json")):
        raise UsageError(f"--samples: {settings.samples} has no manifest.json: not a complete cell_sample.py "
                         f"output folder")


def gap_analysis(settings):
    """Run every section; write OUT/gap_analysis.json and .md; returns the results dict."""
    check_inputs(settings)
    from VAE.VAE_model import load_autoencoder

    progress = settings.progress
    sets, genes = load_inputs(settings, progress)
    heldout = sets["heldout"]
    for name in ("heldout", "train", "generated"):
        if sets[name].counts is None:
            raise UsageError(f"the {name} cells hold no raw counts: the observation-model section needs them "
                             f"(real files with counts in X, samples drawn with --observation counts)")
    autoencoder, _ = load_autoencoder(settings.vae_path, device=resolve_device(settings.device))
    latents = encoded_latents(settings, autoencoder, sets, progress)
    if "generated_on_sphere" in latents:
        sets["generated_on_sphere"], _ = read_set(decode_on_sphere(settings, autoencoder,
                                                                   latents["generated_on_sphere"], progress),
                                                  settings.label_key, "generated_on_sphere")
    poisson = poisson_from_means(sets["reconstructed_heldout_means"].x, heldout.counts.sum(axis=1), settings.seed)
    sets["reconstructed_heldout_poisson"] = CellSet(x=log_normalize(poisson), counts=poisson, labels=heldout.labels)
    expression = {}
    for name in tqdm([n for n in EXPRESSION_SETS if n in sets], desc="expression space", disable=not progress):
        expression[name] = metrics.expression_two_sample(heldout.x, heldout.labels, sets[name].x,
                                                         sets[name].labels, genes, seed=settings.seed,
                                                         use_rf=settings.random_forest)
    latent = latent_section(settings, sets, latents, progress)
    observation = {name: metrics.observation_comparison(heldout.counts, sets[name].counts)
                   for name in OBSERVATION_SETS if name in sets}
    results = json_ready({"settings": asdict(settings), "expression": expression, "latent": latent,
                          "observation": observation, "per_label": per_label_table(sets, expression, latent),
                          "expression_sets": EXPRESSION_SETS})
    write_outputs(settings.out, results)
    return results


def write_outputs(out, results):
    with atomic_output(os.path.join(out, "gap_analysis.json")) as temp_path, open(temp_path, "w") as stream:
        json.dump(results, stream, indent=1, allow_nan=True)
    with atomic_output(os.path.join(out, "gap_analysis.md")) as temp_path, open(temp_path, "w") as stream:
        stream.write(markdown_report(results))


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="the training cells (split.py's train.h5ad)")
    parser.add_argument("--heldout", required=True, help="the held-out real cells (split.py's heldout.h5ad)")
    parser.add_argument("--vae_path", required=True, help="the autoencoder checkpoint the diffusion model used")
    parser.add_argument("--samples", required=True,
                        help="cell_sample.py's output folder (generated.h5ad, the latent .npy files, manifest.json)")
    parser.add_argument("--out", required=True, help="folder for gap_analysis.json / .md and the reconstructions")
    parser.add_argument("--label_key", default=DEFAULT_LABEL_KEY)
    parser.add_argument("--seed", type=int, default=0, help="seed of the count draws, subsamples and folds")
    parser.add_argument("--random_forest", type=str2bool, default=True, help="also the random-forest AUC (slower)")
    parser.add_argument("--progress", type=str2bool, default=True)
    add_threads_arg(parser)
    add_device_arg(parser)
    add_debug_arg(parser)
    return parser


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    check_writable_dir(args.out, "--out")
    settings = GapSettings(train=args.train, heldout=args.heldout, vae_path=args.vae_path, samples=args.samples,
                           out=args.out, label_key=args.label_key, seed=args.seed, random_forest=args.random_forest,
                           device=args.device, progress=args.progress)
    gap_analysis(settings)
    print(f"wrote {os.path.join(args.out, 'gap_analysis.md')} and gap_analysis.json")
    return settings.out


if __name__ == "__main__":
    main()
