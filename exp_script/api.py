"""Evaluation from Python (a notebook), beside the model API of :mod:`guided_diffusion.api`:

    from guided_diffusion.api import generate, load_model
    from exp_script.api import evaluate
    metrics = evaluate(real_adata, generate(load_model(path)), label_key="cell_type1")["generated"]["overall"]
"""
import contextlib
import os
import tempfile

from exp_script.evaluation.pipeline import EvaluationSettings, evaluate as run_evaluation, log_to_stderr
from guided_diffusion.api import as_list, h5ad_path, split_options
from guided_diffusion.core.checks import check_bool, check_int, check_str, check_str_list
from guided_diffusion.core.atomic import check_writable_dir
from guided_diffusion.data import DEFAULT_LABEL_KEY

__all__ = ["evaluate"]
# the options evaluate.py's flags check, as those flags check them (lower bound of each integer)
INTEGER_OPTIONS = {"seed": None, "min_cells": 1, "n_hvg": 1, "n_pcs": 1, "marker_genes": 0, "max_cells": 1,
                   "condition_min_cells": 1, "rare_max_cells": 1, "augmentation_seeds": 1}
BOOLEAN_OPTIONS = ("plots", "controls", "progress", "input_is_log", "generated_input_is_log",
                   "allow_count_like_log")


def check_options(options, label_key):
    """The checks of ``exp_script/evaluate.py``'s flags on the options given (one SettingError naming it)."""
    for name, low in INTEGER_OPTIONS.items():
        if name in options:
            check_int(options[name], name, low)
    for name in BOOLEAN_OPTIONS:
        if name in options:
            check_bool(options[name], name)
    for name in ("layer", "generated_layer"):
        if name in options:
            check_str(options[name], name)
    check_str(label_key, "label_key")


def evaluate(real, generated, label_key=DEFAULT_LABEL_KEY, train=None, out_dir=None, **options):
    """Evaluate ``generated`` against ``real`` (and ``train``, the model's training cells); returns the
    metrics dict (``result["generated"]["overall"]["scc"]``, the controls beside it), as
    ``exp_script/evaluate.py`` writes it to metrics.json.

    Each of ``real``, ``generated``, ``train`` is an .h5ad path or an AnnData (an in-memory one is written to
    a temporary .h5ad first: the evaluator reads files). ``options`` are ``evaluate.py``'s flags
    (``input_is_log`` and ``layer`` for real/train, ``generated_input_is_log``, ``filter``,
    ``condition_key``, ``seed``, ``n_hvg``, ``metrics``, ...) with its defaults; report.md and plots go to
    ``out_dir`` if given (without it nothing is written and ``plots`` defaults to False).

    >>> result = evaluate(real_adata, generate(model), label_key="cell_type1", input_is_log=True)
    >>> result["generated"]["overall"]["scc"], result["real_vs_real"]["overall"]["scc"]
    """
    inputs = {"layer": "", "input_is_log": False, "generated_layer": "", "generated_input_is_log": True,
              "filter": [], "condition_key": [], "allow_count_like_log": False, "progress": True}
    (settings_options,) = split_options(options, EvaluationSettings, extra=tuple(inputs))
    check_options(options, label_key)
    inputs.update({key: value for key, value in options.items() if key in inputs})
    for name in ("filter", "condition_key"):
        inputs[name] = as_list(inputs[name]) or []
        check_str_list(inputs[name], name)
    settings_options.setdefault("plots", out_dir is not None)
    if "metrics" in settings_options:
        settings_options["metrics"] = tuple(as_list(settings_options["metrics"]))
        check_str_list(settings_options["metrics"], "metrics")
    settings = EvaluationSettings(**settings_options)
    with contextlib.ExitStack() as stack:
        real_path = stack.enter_context(h5ad_path(real, "real", inputs["layer"]))
        generated_path = stack.enter_context(h5ad_path(generated, "generated", inputs["generated_layer"]))
        train_path = stack.enter_context(h5ad_path(train, "train", inputs["layer"])) if train is not None else None
        if out_dir is None:
            out_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cfdiffusion_evaluation_"))
        else:
            check_writable_dir(os.fspath(out_dir), "out_dir")
        return run_evaluation(real_path, generated_path, label_key, out_dir, layer=inputs["layer"],
                              input_is_log=inputs["input_is_log"], filters=inputs["filter"], settings=settings,
                              log=log_to_stderr if inputs["progress"] else None, train_path=train_path,
                              generated_layer=inputs["generated_layer"],
                              generated_input_is_log=inputs["generated_input_is_log"],
                              condition_keys=inputs["condition_key"],
                              allow_count_like_log=inputs["allow_count_like_log"])
