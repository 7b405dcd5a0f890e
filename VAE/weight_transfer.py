"""Start an autoencoder from another one's weights, genes and labels matched by name (``--init_from``).

The other autoencoder (the source) may have been trained on other cells with other genes: typically a larger
compatible atlas, pretrained so that the autoencoder learns from more cells than the user's dataset has. Every
weight that does not depend on the genes or labels (hidden layers, BatchNorm statistics, the latent layer) is
copied; the gene-indexed ones are copied gene by gene where the source has the gene:

* the encoder's input weights (a column per gene it reads): a gene the source's encoder did not read starts at
  zero, so the encoder starts as the source's on the genes both read;
* the decoder's output layer (a row and a bias per gene) and the negative-binomial dispersion: a gene the source
  lacks keeps this run's fresh start (random weights, its bias the training cells' mean, the default dispersion);
* the decoder's label effects (a row per label value): copied where the source's decoder read the same key and
  value, zero (no shift) otherwise.

The architecture (latent size, hidden widths, count model, latent kind) must be the source's, and so must the
input normalization (raw counts or log-normalized, the target sum); anything else is a one-line error naming
``init_from``.
"""
import numpy as np
import torch
import torch.nn as nn

from guided_diffusion.core.errors import SettingError, UsageError, literal

from VAE.autoencoder_checkpoint import AutoencoderCheckpoint
from VAE.VAE_model import VAE

ARCHITECTURE = ("latent_dim", "hidden_dims", "loss_ae", "variational")  # must be the source's
MIN_SHARED_GENES = 0.5  # refuse a source that has fewer than this share of the run's genes


def _linears(sequential):
    return [name for name, module in sequential.named_children() if isinstance(module, nn.Linear)]


def _positions(names, wanted):
    """For each name of ``wanted``, its position in ``names`` (-1 where absent)."""
    lookup = {name: position for position, name in enumerate(names)}
    return np.array([lookup.get(name, -1) for name in wanted], dtype=np.int64)


def _copy_rows(target, source, positions, dim):
    """``target``'s slices along ``dim`` set to ``source``'s at ``positions`` where they are >= 0 (in place)."""
    keep = torch.as_tensor(np.flatnonzero(positions >= 0), dtype=torch.long)
    take = torch.as_tensor(positions[positions >= 0], dtype=torch.long)
    target.index_copy_(dim, keep, source.index_select(dim, take).to(target.dtype))


def check_compatible(source, model, source_normalization, normalization, path):
    """Refuse a source whose architecture or input normalization differs from this run's (one line, both)."""
    source_config, config = source.config(), model.config()
    for name in ARCHITECTURE:
        if source_config[name] != config[name]:
            raise SettingError(f"{{init_from}} {literal(path)} has {name} {source_config[name]}, this run "
                               f"{config[name]}; start from an autoencoder of the same architecture", "init_from")
    if model.latent_on_sphere != source.latent_on_sphere:
        raise SettingError(f"{{init_from}} {literal(path)} has latent_norm {source.latent_norm}, this run "
                           f"{model.latent_norm}; start from an autoencoder with the same latent", "init_from")
    for name in ("input_is_log", "target_sum"):
        if source_normalization.get(name) != normalization.get(name):
            raise SettingError(f"{{init_from}} {literal(path)} was trained with {name} "
                               f"{source_normalization.get(name)}, this data has {normalization.get(name)}; start "
                               f"from an autoencoder trained on the same kind of input", "init_from")


def transfer_weights(path, model, genes, normalization):
    """Set ``model``'s weights from the autoencoder checkpoint at ``path`` (genes and labels matched by name;
    ``genes``: this run's genes in order, ``normalization``: this data's as a dict); returns a record of what was
    matched (also kept in the run's checkpoints)."""
    try:
        checkpoint = AutoencoderCheckpoint.load(path)
    except UsageError as error:  # not an autoencoder checkpoint: say which flag gave it
        raise SettingError(f"{{init_from}}: {literal(error)}", "init_from") from None
    source = VAE(**VAE.complete_config(checkpoint.model_config))
    source.load_state_dict(checkpoint.state_dict)
    if checkpoint.dispersion_fit is not None and "learned_log_theta" in checkpoint.dispersion_fit:
        with torch.no_grad():  # continue from what it learned; this run refits its own at the end
            source.log_theta.copy_(torch.as_tensor(checkpoint.dispersion_fit["learned_log_theta"]))
    check_compatible(source, model, checkpoint.normalization, normalization, path)
    genes = [str(gene) for gene in genes]
    output = _positions(checkpoint.genes, genes)
    shared = int((output >= 0).sum())
    if shared < MIN_SHARED_GENES * len(genes):
        raise SettingError(f"{{init_from}} {literal(path)} shares {shared} of this data's {len(genes)} genes (by "
                           f"name); start from an autoencoder trained on at least half of them", "init_from")
    source_inputs = [checkpoint.genes[i] for i in source.encoder_genes] or list(checkpoint.genes)
    inputs = [genes[i] for i in model.encoder_genes] or genes
    input_positions = _positions(source_inputs, inputs)

    state, source_state = model.state_dict(), source.state_dict()
    first_input = f"encoder.{_linears(model.encoder)[0]}.weight"
    input_keys = {first_input} | ({"encoder_log_var.weight"} if model.variational and not model.hidden_dims else set())
    last_output = _linears(model.decoder)[-1]
    output_keys = {f"decoder.{last_output}.weight", f"decoder.{last_output}.bias", "log_theta"}
    label_rows = _label_positions(source, model)
    with torch.no_grad():
        for key, value in state.items():
            if key in input_keys:
                value.zero_()
                _copy_rows(value, source_state[key], input_positions, 1)
            elif key in output_keys:
                _copy_rows(value, source_state[key], output, 0)
            elif key.startswith("decoder_label_effects."):
                value.zero_()
                if label_rows is not None:
                    _copy_rows(value, source_state[key], label_rows, 0)
            elif key not in source_state or source_state[key].shape != value.shape:
                raise SettingError(f"{{init_from}} {literal(path)} has no weights of this architecture's {key}; "
                                   f"start from an autoencoder of the same architecture", "init_from")
            else:
                value.copy_(source_state[key])
    model.load_state_dict(state)
    return {"path": str(path), "source_genes": len(checkpoint.genes), "shared_genes": shared,
            "encoder_genes_shared": int((input_positions >= 0).sum()), "encoder_genes": len(inputs),
            "labels_shared": int((label_rows >= 0).sum()) if label_rows is not None else 0,
            "source_step": int(checkpoint.step), "source_data": checkpoint.data_fingerprint}


def _label_positions(source, model):
    """For each row of ``model``'s label-effect tables, the source's row of the same key and value (-1: none);
    None when the source's decoder reads no labels."""
    if not source.reads_labels or not model.reads_labels:
        return None
    source_rows = {(key, value): row for row, (key, value) in enumerate(
        (key, value) for key, values in zip(source.decoder_label_keys, source.decoder_labels) for value in values)}
    wanted = [(key, value) for key, values in zip(model.decoder_label_keys, model.decoder_labels) for value in values]
    return np.array([source_rows.get(pair, -1) for pair in wanted], dtype=np.int64)
