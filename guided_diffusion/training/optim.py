"""Optimizer plumbing shared by both trainers (the autoencoder and the diffusion model)."""
import torch


def adamw(parameters, lr, weight_decay):
    """AdamW with the fused kernel where the parameters' device has one (CPU and CUDA): on CPU it is
    ~6x faster than the default per-tensor loop (measured: 0.03 s vs 0.17 s per step for the
    autoencoder's 45M parameters), which matters for the autoencoder's 20,125-gene layers."""
    parameters = list(parameters)  # tensors, or parameter groups (dicts with "params")
    tensors = [p for group in parameters for p in group["params"]] if parameters and isinstance(parameters[0], dict) \
        else parameters
    fused = all(p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


def all_finite(module):
    """True when every parameter and buffer of ``module`` is finite (no NaN or inf)."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in list(module.parameters()) + list(module.buffers())
               if tensor.is_floating_point())


def ema_warmup_rate(ema_rate, step):
    """EMA decay at ``step``: grows from 0.1 towards ``ema_rate`` so short runs average sensibly."""
    return min(ema_rate, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_weight_average(average, model, decay):
    """``average``'s parameters move towards ``model``'s (``average = decay * average + (1 - decay) * model``);
    its buffers (BatchNorm statistics, which already average over recent batches) are copied."""
    averaged, current = list(average.parameters()), [p.detach() for p in model.parameters()]
    # the same two operations per tensor as avg.mul_(decay).add_(param, alpha=1 - decay), in two kernels
    torch._foreach_mul_(averaged, decay)
    torch._foreach_add_(averaged, current, alpha=1.0 - decay)
    for kept, buffer in zip(average.buffers(), model.buffers()):
        kept.copy_(buffer)
