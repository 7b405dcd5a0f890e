"""Classifier-free guidance: null labels, label dropout for training, guided epsilon.

One weight ``w`` for every key is the usual classifier-free guidance,
``eps = (1 + w)·eps(all keys) − w·eps(no key)``. Per-key weights ``w_1..w_K`` (label-key order) use the
nested form the per-key label dropout makes possible (each key dropped independently in training, so the
network predicts with any prefix of the keys conditioned)::

    eps = eps(S_K) + Σ_k w_k·(eps(S_k) − eps(S_{k−1})),   S_k = the first k keys conditioned, S_0 = none

The term of key k is what conditioning on key k adds given the keys before it (for cell type x donor:
the donor's effect within the cell type). The differences telescope, so equal weights give exactly the
single-weight formula; as a linear combination ``eps = Σ_j c_j·eps(S_j)`` the coefficients are
``c_K = 1 + w_K``, ``c_j = w_j − w_{j+1}`` and ``c_0 = −w_1`` (they sum to 1), and only the prefixes with
a non-zero coefficient are evaluated, all in one batched forward.

The composed form (``form="composed"``, a product of experts as in composable diffusion models) combines
the single-key predictions the per-key dropout also trains, and never queries the full combination::

    eps = eps(∅) + Σ_k (1 + w_k)·(eps(key k only) − eps(∅))

For a combination never seen in training (a cell type in a donor) the network's eps(type, donor) is an
extrapolation; eps(type only) and eps(donor only) were trained on many cells each. With one key both
forms are the single-weight formula.

A guidance interval (``composed_interval`` of :func:`guided_eps_fn`, model timesteps ``[lo, hi)``) applies the
composed rows' weights only to steps whose timestep lies in it; at the other steps those rows take the composed
form with every weight 0 (the plain product of the single-key experts, no amplification). For unseen combinations
of the bundled data, guiding the low-noise half only ([0, T/2)) called the intended donor more often than guiding
every step, at the same realism (docs/sampling.md).
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch

from guided_diffusion.diffusion.feature_cache import FeatureCache

Weights = Union[float, Sequence[float]]
SINGLE_WEIGHT_FORMULA = "eps = (1 + w) eps(all keys) - w eps(no key)"
PER_KEY_FORMULA = "eps = eps(S_K) + sum_k w_k (eps(S_k) - eps(S_k-1)), S_k = the first k label keys conditioned"
COMPOSED_FORMULA = "eps = eps(none) + sum_k (1 + w_k) (eps(key k only) - eps(none))"
FORMS = ("nested", "composed")


def guidance_formula(guide_w, form="nested") -> str:
    """The formula recorded in the output: per-key weights (a mapping or a sequence) use the nested form
    unless ``form`` is ``composed``."""
    check_form(form)
    if form == "composed":
        return COMPOSED_FORMULA
    return SINGLE_WEIGHT_FORMULA if isinstance(guide_w, (int, float)) else PER_KEY_FORMULA


def check_form(form):
    if form not in FORMS:
        raise ValueError(f"the guidance form must be one of {', '.join(FORMS)}, got {form!r}")


def null_condition(cond: torch.Tensor, condition_sizes: Sequence[int]) -> torch.Tensor:
    """A (B, K) LongTensor with every key set to its null value condition_sizes[k]."""
    null_row = torch.as_tensor(list(condition_sizes), dtype=torch.long, device=cond.device)
    return null_row.expand(cond.shape[0], -1).clone()


def drop_conditions(
    cond: torch.Tensor,
    condition_sizes: Sequence[int],
    p_uncond: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Replace each key of each row by its null value independently with probability p_uncond."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    if generator is None:
        uniform = torch.rand(cond.shape, device=cond.device)
    else:
        uniform = torch.rand(cond.shape, generator=generator, device=generator.device).to(cond.device)
    return torch.where(uniform < p_uncond, null_condition(cond, condition_sizes), cond)


def key_weights(guide_w: Weights, n_keys: int) -> List[float]:
    """One weight per key: a single weight is repeated, a sequence must have one entry per key."""
    if isinstance(guide_w, (int, float)):
        return [float(guide_w)] * n_keys
    weights = [float(w) for w in guide_w]
    if len(weights) != n_keys:
        raise ValueError(f"{len(weights)} guidance weights for {n_keys} label keys")
    return weights


def prefix_coefficients(weights: Sequence[float]) -> List[Tuple[int, float]]:
    """The non-zero (prefix length j, coefficient c_j) of the nested guided epsilon, longest prefix first."""
    n_keys = len(weights)
    coefficients = [(n_keys, 1.0 + weights[-1])]
    coefficients += [(j, weights[j - 1] - weights[j]) for j in range(n_keys - 1, 0, -1)]
    coefficients.append((0, -weights[0]))
    return [(prefix, c) for index, (prefix, c) in enumerate(coefficients) if index == 0 or c != 0]


def prefix_condition(cond: torch.Tensor, condition_sizes: Sequence[int], prefix: int) -> torch.Tensor:
    """``cond`` with every key from position ``prefix`` on set to its null value."""
    if prefix == len(condition_sizes):
        return cond
    if prefix == 0:
        return null_condition(cond, condition_sizes)
    return torch.cat([cond[:, :prefix], null_condition(cond, condition_sizes)[:, prefix:]], dim=1)


def composed_coefficients(weights: Sequence[float], keep_all: bool = False) -> List[Tuple[Optional[int], float]]:
    """The (kept key, coefficient) terms of the composed form: one per key k with a non-zero ``1 + w_k``
    (key k conditioned alone; every key with ``keep_all``, so that the terms do not depend on the weights), then
    the unconditioned term (kept key None) with ``1 − Σ_k (1 + w_k)``."""
    terms = [(key, 1.0 + w) for key, w in enumerate(weights) if keep_all or 1.0 + w != 0]
    return terms + [(None, 1.0 - sum(c for _, c in terms))]


def single_key_condition(cond: torch.Tensor, condition_sizes: Sequence[int], key: Optional[int]) -> torch.Tensor:
    """``cond`` with every key but ``key`` set to its null value (all of them when ``key`` is None)."""
    null = null_condition(cond, condition_sizes)
    if key is None:
        return null
    null[:, key] = cond[:, key]
    return null


def composed_batch(cond: torch.Tensor, condition_sizes: Sequence[int], weights: Sequence[float],
                   keep_all: bool = False) -> torch.Tensor:
    """The condition rows of one composed forward: one copy per term of :func:`composed_coefficients`."""
    return torch.cat([single_key_condition(cond, condition_sizes, key)
                      for key, _ in composed_coefficients(weights, keep_all)])


def guidance_batch(cond: torch.Tensor, condition_sizes: Sequence[int], guide_w: Weights = 1.0) -> torch.Tensor:
    """The condition rows of one guided forward: one copy of ``cond`` per evaluated prefix, longest first
    (for a single weight: the conditional rows, then their null copies)."""
    terms = prefix_coefficients(key_weights(guide_w, len(condition_sizes)))
    return torch.cat([prefix_condition(cond, condition_sizes, prefix) for prefix, _ in terms])


def guided_eps(
    model,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    guide_w: Weights,
    cache: Optional[FeatureCache] = None,
    cond_scales=None,
    form: str = "nested",
    composed_rows: Optional[torch.Tensor] = None,
    composed_weights: Optional[Weights] = None,
    keep_all_terms: bool = False,
) -> torch.Tensor:
    """Classifier-free guided noise prediction: ``(1 + w)·eps_cond − w·eps_uncond`` for one weight, the
    nested per-key form (module docstring) for one weight per key, or the composed form (``form``).

    Every evaluated conditioning runs in one stacked batch, so a cache used here holds features for the
    stacked batch. With all weights 0 only the conditional pass of the nested form runs and is returned
    unchanged. ``composed_rows`` (a boolean (B,) tensor) takes the composed form with ``composed_weights``
    (default: ``guide_w``) for those rows, and ``form`` with ``guide_w`` for the others, in one stacked forward.
    ``keep_all_terms``: the composed form evaluates every single-key term, even one whose coefficient is 0.
    """
    check_form(form)
    n_keys = len(model.condition_sizes)
    if composed_rows is not None and n_keys > 1:
        special = key_weights(guide_w if composed_weights is None else composed_weights, n_keys)
        if bool(composed_rows.all()):
            return composed_eps(model, x, t, cond, special, cache, cond_scales, keep_all_terms)
        if bool(composed_rows.any()):
            return mixed_eps(model, x, t, cond, key_weights(guide_w, n_keys), form, composed_rows, special, cache,
                             cond_scales, keep_all_terms)
    if form == "composed" and n_keys > 1:
        return composed_eps(model, x, t, cond, key_weights(guide_w, len(model.condition_sizes)), cache, cond_scales,
                            keep_all_terms)
    terms = prefix_coefficients(key_weights(guide_w, len(model.condition_sizes)))
    if len(terms) == 1:
        return model(x, t, cond, cache=cache, cond_scales=cond_scales)
    copies = len(terms)
    eps = model(torch.cat([x] * copies), torch.cat([t] * copies), guidance_batch(cond, model.condition_sizes, guide_w),
                cache=cache, cond_scales=cond_scales).chunk(copies)
    if copies == 2:  # one weight for all keys: exactly the classic expression
        weight = -terms[1][1]
        return (1 + weight) * eps[0] - weight * eps[1]
    guided = terms[0][1] * eps[0]
    for (_, coefficient), part in zip(terms[1:], eps[1:]):
        guided = guided + coefficient * part
    return guided


def composed_eps(model, x, t, cond, weights, cache=None, cond_scales=None, keep_all=False):
    """The composed form's prediction: every term in one stacked forward, combined with its coefficient."""
    terms = composed_coefficients(weights, keep_all)
    copies = len(terms)
    eps = model(torch.cat([x] * copies), torch.cat([t] * copies),
                composed_batch(cond, model.condition_sizes, weights, keep_all),
                cache=cache, cond_scales=cond_scales).chunk(copies)
    return combine(terms, eps)


def combine(terms, eps):
    guided = terms[0][1] * eps[0]
    for (_, coefficient), part in zip(terms[1:], eps[1:]):
        guided = guided + coefficient * part
    return guided


def form_terms(form, weights):
    """The (term, coefficient) list of ``form`` for per-key ``weights``."""
    return composed_coefficients(weights) if form == "composed" else prefix_coefficients(weights)


def form_batch(cond, condition_sizes, form, weights):
    """The condition rows of ``form``'s terms, one copy of ``cond`` per term."""
    if form == "composed":
        return composed_batch(cond, condition_sizes, weights)
    return guidance_batch(cond, condition_sizes, weights)


def mixed_rows(cond, condition_sizes, weights, form, composed_weights, keep_all=False):
    """The condition rows of a batch where some rows take ``form`` with ``weights`` and the others the composed
    form with ``composed_weights``: the first group's copies, then the second's, stacked for one forward."""
    return torch.cat([form_batch(cond, condition_sizes, form, weights),
                      composed_batch(cond, condition_sizes, composed_weights, keep_all)])


def mixed_eps(model, x, t, cond, weights, form, composed_rows, composed_weights, cache=None, cond_scales=None,
              keep_all=False):
    """Per row, the composed form with ``composed_weights`` where ``composed_rows``, else ``form`` with
    ``weights``, from one forward."""
    base_terms, composed_terms = form_terms(form, weights), composed_coefficients(composed_weights, keep_all)
    copies = len(base_terms) + len(composed_terms)
    eps = model(torch.cat([x] * copies), torch.cat([t] * copies),
                mixed_rows(cond, model.condition_sizes, weights, form, composed_weights, keep_all),
                cache=cache, cond_scales=cond_scales).chunk(copies)
    base = combine(base_terms, eps[:len(base_terms)])
    composed = combine(composed_terms, eps[len(base_terms):])
    return torch.where(composed_rows.to(base.device).reshape(-1, *([1] * (base.dim() - 1))), composed, base)


def guided_eps_fn(
    model,
    cond: torch.Tensor,
    guide_w: Weights,
    cache: Optional[FeatureCache] = None,
    refresh: Optional[Sequence[bool]] = None,
    form: str = "nested",
    composed_rows: Optional[torch.Tensor] = None,
    composed_weights: Optional[Weights] = None,
    composed_interval: Optional[Tuple[float, float]] = None,
):
    """An ``eps_fn(x, t, step_index)`` for the diffusion samplers.

    ``guide_w`` is one weight or one per label key (the model's key order); ``form`` the guidance form
    (``nested`` or ``composed``, module docstring); ``composed_rows`` a boolean (B,) tensor of the rows that take
    the composed form with ``composed_weights`` (default ``guide_w``; the others take ``form``).
    ``composed_interval`` ``(lo, hi)`` (model timesteps): the composed rows' weights apply at steps with
    ``lo <= t < hi`` only, every weight 0 at the others (the guidance interval; no effect without composed rows,
    the other rows are guided at every step). With a cache,
    ``refresh[step_index]`` (e.g. from ``refresh_schedule``) decides whether the step runs a full pass;
    the cache branch is checked against the model here, before sampling starts.
    """
    if cache is not None:
        if refresh is None:
            raise ValueError("a refresh schedule is required when a cache is given")
        model.validate_branch(cache.branch)
        if not refresh[0]:
            raise ValueError("the refresh schedule must refresh at step 0 to fill the cache")
    check_form(form)
    weights = key_weights(guide_w, len(model.condition_sizes))
    special = key_weights(guide_w if composed_weights is None else composed_weights, len(weights))
    all_composed = False  # every row is a composed row: ``weights`` are the composed rows' weights
    if composed_rows is not None and len(weights) > 1:
        if bool(composed_rows.all()):
            form, weights, composed_rows, all_composed = "composed", special, None, True
        elif not bool(composed_rows.any()):
            composed_rows = None
    if (composed_rows is None and not all_composed) or len(weights) < 2:
        composed_interval = None  # no composed rows: nothing to switch off
    keep_all = composed_interval is not None  # the same terms (and rows) inside and outside the interval
    off = [0.0] * len(weights)
    terms = prefix_coefficients(weights)

    # the condition projections do not depend on the step: compute them once for the whole loop
    if composed_rows is not None and len(weights) > 1:
        rows = mixed_rows(cond, model.condition_sizes, weights, form, special, keep_all)
    elif form == "composed" and len(weights) > 1:
        rows = composed_batch(cond, model.condition_sizes, weights, keep_all)
    else:
        rows = cond if len(terms) == 1 else guidance_batch(cond, model.condition_sizes, weights)
    cond_scales = model.condition_scales(rows)

    def eps_fn(x: torch.Tensor, t: torch.Tensor, step_index: int) -> torch.Tensor:
        if cache is not None:
            cache.refresh = bool(refresh[step_index])
        step_weights, step_special = weights, special
        if composed_interval is not None and not composed_interval[0] <= float(t.reshape(-1)[0]) < composed_interval[1]:
            step_special = off
            if all_composed:
                step_weights = off
        return guided_eps(model, x, t, cond, step_weights, cache=cache, cond_scales=cond_scales, form=form,
                          composed_rows=composed_rows, composed_weights=step_special, keep_all_terms=keep_all)

    return eps_fn
