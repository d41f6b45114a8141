"""The generator's inductive bias K_θ(x) = J Jᵀ, J = ∂G(z)/∂θ (the paper's appendix, eq. 21).

A regression step of size η on the summed ½‖G(z) − x'‖² moves the parameters by
Δθ = η Jᵀ r with r = x' − x, so to first order the samples move by

    Δx ≈ η J Jᵀ r = η K_θ r.

K_θ is what the generator makes of a target source's request r: where K is a
multiple κ·I the request is honoured (scaled by ηκ); elsewhere it is bent
towards what the generator can represent. ``target_reach`` in the training log
is this, measured: see docs/theory.md.

Everything here works on any ``nn.Module`` generator through ``torch.func``:
the exact K for small models (``kernel``), and its action on a vector with one
vector-Jacobian and one Jacobian-vector product for large ones
(``kernel_vector_product``). Buffers (BatchNorm statistics) are copied, never
updated, so probing leaves the model untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp

from .api import Batch
from .data import iterate_batches
from .errors import ConfigError


def _as_function(generator: nn.Module, z: Tensor) -> tuple[Callable[[dict[str, Tensor]], Tensor], dict[str, Tensor]]:
    """G(z) as a function of the trainable parameters alone (flattened output)."""
    params = {name: p.detach() for name, p in generator.named_parameters() if p.requires_grad}
    buffers = {name: b.detach().clone() for name, b in generator.named_buffers()}

    def output(theta: dict[str, Tensor]) -> Tensor:
        copies = {name: b.clone() for name, b in buffers.items()}  # train-mode BatchNorm writes into these
        return functional_call(generator, {**theta, **copies}, (z,)).reshape(-1)

    return output, params


def jacobian(generator: nn.Module, z: Tensor) -> Tensor:
    """J = ∂G(z)/∂θ as a (number of outputs) × (number of parameters) matrix. Small models only."""
    output, params = _as_function(generator, z)
    blocks = jacrev(output)(params)
    return torch.cat([blocks[name].reshape(blocks[name].shape[0], -1) for name in params], dim=1)


def kernel(generator: nn.Module, z: Tensor) -> Tensor:
    """K_θ = J Jᵀ over all outputs of the batch ``z`` (cross-sample blocks included)."""
    j = jacobian(generator, z)
    return j @ j.T


def kernel_vector_product(generator: nn.Module, z: Tensor, v: Tensor) -> Tensor:
    """K_θ v = J (Jᵀ v) without forming J: a vector-Jacobian product, then a Jacobian-vector product.

    ``v`` has the shape of G(z); so has the result.
    """
    output, params = _as_function(generator, z)
    _, pullback = vjp(output, params)
    (jt_v,) = pullback(v.reshape(-1))
    with warnings.catch_warnings():
        # torch's forward-mode AD registers its decompositions with torch.jit.script on first
        # use, which warns that jit.script is deprecated: torch's own business, not the user's
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        _, j_jt_v = jvp(output, (params,), (jt_v,))
    return j_jt_v.reshape(v.shape)


def _request(generator: nn.Module, z: Tensor, targets: Tensor) -> Tensor:
    """r = x' − G(z): the move the target source asks for."""
    with torch.no_grad():
        return targets - generator(z)


def _reach(request: Tensor, move: Tensor) -> float:
    """``target_reach`` for a move: 1 − ‖r − Δx‖² / ‖r‖²."""
    return (1.0 - (request - move).pow(2).sum() / request.pow(2).sum()).item()


def predicted_move(generator: nn.Module, z: Tensor, targets: Tensor, step: float) -> Tensor:
    """First-order change of G(z) after one SGD step of size ``step`` on the summed ½‖G(z) − x'‖²."""
    return step * kernel_vector_product(generator, z, _request(generator, z, targets))


def predicted_reach(generator: nn.Module, z: Tensor, targets: Tensor, step: float) -> float:
    """The ``target_reach`` the training log would show for that step, predicted from K_θ:
    1 − ‖r − ηK r‖² / ‖r‖², with r = x' − G(z)."""
    request = _request(generator, z, targets)
    return _reach(request, step * kernel_vector_product(generator, z, request))


def rayleigh_quotient(generator: nn.Module, z: Tensor, v: Tensor) -> float:
    """κ(v) = vᵀ K v / vᵀ v: how strongly the generator responds to a request along ``v``."""
    return ((v * kernel_vector_product(generator, z, v)).sum() / v.pow(2).sum()).item()


def probe_run(run, batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    """K_θ of a trained decomposed run, along what its target source asks for.

    Draws one batch (seeded), lets the source propose targets x' for it, and
    reports κ along the request r = x' − G(z) next to κ along random
    directions (trace(K) / n, Hutchinson's estimate); the alignment
    cos(r, K r), whose square is the largest reach any SGD step can have, and
    that step; and the reach of one SGD regression step of size λ2.
    """
    source = run.source
    if source is None:
        raise ConfigError("probe: a standard run has no target source; probe a decomposed run (inversion, imle, ...)")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(run.data.dataset), generator=g)
    batch: Batch = next(iterate_batches(run.data.dataset, order, batch_size, 0, False))
    torch.manual_seed(seed)
    step = source.probe_step(run.step)
    targets = source.propose(batch, step)
    if len(targets.z) == 0:
        raise ConfigError(f"probe: targets '{run.config.targets.name}' proposed no targets at step {step}")
    generator, z = run.generator, targets.z[:batch_size].detach()  # a pool (cfg): its first batch
    request = _request(generator, z, targets.x[:batch_size].detach())
    k_request = kernel_vector_product(generator, z, request)
    r_k_r = (request * k_request).sum().item()
    probes = [torch.randn(request.shape, generator=g).to(request) for _ in range(4)]
    lr = run.config.regression.lr / run.config.regression.steps
    return {
        # how strongly G responds along the request, and along random directions
        "kappa_request": r_k_r / request.pow(2).sum().item(),
        "kappa_random": sum(rayleigh_quotient(generator, z, v) for v in probes) / len(probes),
        # cos(r, K r): 1 when G can move exactly as asked; its square is the best reach any SGD step gets
        "alignment": r_k_r / (request.norm() * k_request.norm()).item(),
        "best_sgd_reach": r_k_r**2 / (request.pow(2).sum() * k_request.pow(2).sum()).item(),
        "best_sgd_lr": r_k_r / k_request.pow(2).sum().item(),
        "lr": lr,
        "sgd_reach_at_lr": _reach(request, lr * k_request),
        "request_norm_per_sample": request.flatten(1).norm(dim=1).mean().item(),
    }
