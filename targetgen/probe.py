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

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp


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
    _, j_jt_v = jvp(output, (params,), (jt_v,))
    return j_jt_v.reshape(v.shape)


def predicted_move(generator: nn.Module, z: Tensor, targets: Tensor, step: float) -> Tensor:
    """First-order change of G(z) after one SGD step of size ``step`` on the summed ½‖G(z) − x'‖²."""
    with torch.no_grad():
        request = targets - generator(z)
    return step * kernel_vector_product(generator, z, request)


def predicted_reach(generator: nn.Module, z: Tensor, targets: Tensor, step: float) -> float:
    """The ``target_reach`` the training log would show for that step, predicted from K_θ:
    1 − ‖r − ηK r‖² / ‖r‖², with r = x' − G(z)."""
    with torch.no_grad():
        request = targets - generator(z)
    move = step * kernel_vector_product(generator, z, request)
    return (1.0 - (request - move).pow(2).sum() / request.pow(2).sum()).item()


def rayleigh_quotient(generator: nn.Module, z: Tensor, v: Tensor) -> float:
    """κ(v) = vᵀ K v / vᵀ v: how strongly the generator responds to a request along ``v``."""
    return ((v * kernel_vector_product(generator, z, v)).sum() / v.pow(2).sum()).item()
