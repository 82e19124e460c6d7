"""Merge methods over state dicts: linear (model soup), SLERP, TIES and DARE.

Each method has a tensor kernel (`*_tensors`) that merges one parameter, and a state-dict function that applies it
to every floating-point tensor with weights that may differ per tensor. Arithmetic runs in float32 (float64 stays
float64) and each result is cast back to its input's dtype, as mergekit does. Tensors that are not floating point
(integer buffers such as step counters) are taken unchanged from the first model.

TIES and DARE work on task vectors, the differences `model - base`, and add their combination back to the base.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from cognate.merge.compat import check_compatible

StateDict = dict[str, torch.Tensor]
# One weight per model for every tensor, or a table giving each tensor (by name) its own weights.
TensorWeights = Sequence[float] | Mapping[str, Sequence[float]]

SLERP_DOT_THRESHOLD = 0.9995  # mergekit's: above this |cos| the two tensors count as colinear and are lerped


class MergeError(ValueError):
    """Merge inputs that cannot be combined (bad weights or parameters); the message says which."""


# --- tensor kernels ------------------------------------------------------------------------------------------


def linear_tensors(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """sum_i w_i * x_i, divided by sum_i w_i when `normalize` (a weighted average, the model soup)."""
    _check_weight_count(weights, len(tensors))
    if normalize:
        total = math.fsum(weights)
        if abs(total) < 1e-12:
            raise MergeError(
                f"linear merge with normalize=True needs weights that do not sum to 0, got {list(weights)}"
            )
        weights = [w / total for w in weights]
    dtype = _compute_dtype(tensors[0])
    result = torch.zeros_like(tensors[0], dtype=dtype)
    # Accumulating one model at a time keeps memory flat and the summation order fixed (bit-reproducible).
    for tensor, weight in zip(tensors, weights):
        result.add_(tensor.to(dtype), alpha=weight)
    return result.to(tensors[0].dtype)


def slerp_tensors(
    a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = SLERP_DOT_THRESHOLD, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1), treating each whole tensor as one flat vector.

    The angle comes from the normalised vectors, the interpolation acts on the raw ones (as in mergekit). When the
    two are nearly colinear (|cos| > dot_threshold) or one is ~zero the angle is ill-conditioned: fall back to lerp.
    """
    if not 0.0 <= t <= 1.0:
        raise MergeError(f"slerp needs 0 <= t <= 1, got t={t}")
    dtype = _compute_dtype(a)
    x, y = a.to(dtype).flatten(), b.to(dtype).flatten()
    norm_x, norm_y = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    if norm_x < eps or norm_y < eps:
        return _lerp(x, y, t).reshape(a.shape).to(a.dtype)
    dot = float(torch.dot(x / norm_x, y / norm_y).clamp(-1.0, 1.0))
    if abs(dot) > dot_threshold:
        return _lerp(x, y, t).reshape(a.shape).to(a.dtype)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    coef_x, coef_y = math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta
    return (coef_x * x + coef_y * y).reshape(a.shape).to(a.dtype)


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim step: keep the k = max(1, int(density * numel)) largest-magnitude entries, zero the rest.

    k is counted as mergekit counts it, so TIES merges match mergekit's entry for entry.
    """
    _check_density(density)
    if density >= 1.0:
        return delta
    keep = max(1, int(density * delta.numel()))
    flat = delta.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat.abs(), keep, sorted=False).indices] = True
    return (flat * mask).reshape(delta.shape)


def drop_and_rescale(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True
) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, and divide the survivors by `density` when `rescale`.

    The mask is drawn on the CPU from `generator` whatever the tensor's device, so a seed gives the same mask
    everywhere. Rescaling by 1/density keeps the task vector's expectation (the DARE paper); mergekit instead
    rescales to match the L1 norm, which agrees in expectation.
    """
    _check_density(density)
    if density >= 1.0:
        return delta
    keep = (torch.rand(delta.shape, generator=generator) < density).to(delta.device)
    kept = delta * keep
    return kept / density if rescale else kept


def ties_tensors(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float = 0.5,
    scale: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each task vector to `density`, elect a sign per entry by the summed
    weighted values, average the entries that agree with it (the disjoint mean), add `scale` times that to base."""
    _check_weight_count(weights, len(tensors))
    dtype = _compute_dtype(base)
    deltas = [trim_by_magnitude(t.to(dtype) - base.to(dtype), density) for t in tensors]
    return _combine_task_vectors(base, deltas, weights, elect_sign=True, normalize=normalize, scale=scale)


def dare_tensors(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    generator: torch.Generator,
    rescale: bool = True,
    combine: str = "linear",
    scale: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """DARE (Yu et al. 2023): drop-and-rescale each task vector, then combine them linearly (`combine="linear"`,
    mergekit's dare_linear) or with TIES's sign election and disjoint mean (`combine="ties"`, dare_ties)."""
    _check_weight_count(weights, len(tensors))
    if combine not in ("linear", "ties"):
        raise MergeError(f"dare combine must be 'linear' or 'ties', got {combine!r}")
    dtype = _compute_dtype(base)
    deltas = [drop_and_rescale(t.to(dtype) - base.to(dtype), density, generator, rescale) for t in tensors]
    return _combine_task_vectors(
        base, deltas, weights, elect_sign=combine == "ties", normalize=normalize, scale=scale
    )


def _combine_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    elect_sign: bool,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """base + scale * sum_i w_i d_i (over agreeing entries only when `elect_sign`), divided by the summed weights
    of the contributing entries when `normalize` (entries nobody contributes to stay at base)."""
    weighted = torch.stack(deltas)
    w = torch.tensor(list(weights), dtype=weighted.dtype, device=weighted.device).view(-1, *[1] * base.dim())
    weighted = weighted * w
    if elect_sign:
        # mergekit's tie-break: an entry whose summed value is exactly 0 elects the positive sign.
        elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
        contributes = weighted.sign() == elected
    else:
        contributes = torch.ones_like(weighted, dtype=torch.bool)
    merged = (weighted * contributes).sum(dim=0)
    if normalize:
        divisor = (w * contributes).sum(dim=0)
        merged = merged / torch.where(divisor.abs() < 1e-12, torch.ones_like(divisor), divisor)
    return (base.to(merged.dtype) + scale * merged).to(base.dtype)


# --- state dicts ---------------------------------------------------------------------------------------------


def linear(models: Sequence[StateDict], weights: TensorWeights, normalize: bool = True) -> StateDict:
    """Weighted average of the models (`normalize=True`: the weights are divided by their sum, so [2, 1, 1] and
    [0.5, 0.25, 0.25] are the same merge), or the raw weighted sum (`normalize=False`, task arithmetic style)."""
    _check_models(models)
    return _merge_each(
        models, lambda name, ts: linear_tensors(ts, _weights_for(weights, name, len(models)), normalize)
    )


def slerp(a: StateDict, b: StateDict, t: float | Mapping[str, float]) -> StateDict:
    """SLERP between two models, tensor by tensor; `t` is one fraction for all tensors or a table by tensor name."""
    _check_models([a, b])
    return _merge_each([a, b], lambda name, ts: slerp_tensors(ts[0], ts[1], _fraction_for(t, name)))


def ties(
    base: StateDict,
    models: Sequence[StateDict],
    weights: TensorWeights,
    density: float = 0.5,
    scale: float = 1.0,
    normalize: bool = True,
) -> StateDict:
    """TIES-merging of the models' task vectors against `base` (see `ties_tensors`)."""
    _check_models(models, base)
    return _merge_each(
        models,
        lambda name, ts: ties_tensors(
            base[name], ts, _weights_for(weights, name, len(models)), density, scale, normalize
        ),
    )


def dare(
    base: StateDict,
    models: Sequence[StateDict],
    weights: TensorWeights,
    density: float,
    seed: int,
    rescale: bool = True,
    combine: str = "linear",
    scale: float = 1.0,
    normalize: bool = False,
) -> StateDict:
    """DARE over the models' task vectors against `base` (see `dare_tensors`).

    Each tensor's drop masks come from a generator seeded by (seed, tensor name), so a tensor's masks do not depend
    on which other tensors the model has or the order they come in.
    """
    _check_models(models, base)
    return _merge_each(
        models,
        lambda name, ts: dare_tensors(
            base[name],
            ts,
            _weights_for(weights, name, len(models)),
            density,
            torch.Generator().manual_seed(tensor_seed(seed, name)),
            rescale,
            combine,
            scale,
            normalize,
        ),
    )


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor's random draws, derived from the merge seed and the tensor's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- helpers -------------------------------------------------------------------------------------------------


def _merge_each(
    models: Sequence[StateDict], merge_tensor: Callable[[str, list[torch.Tensor]], torch.Tensor]
) -> StateDict:
    first = models[0]
    return {
        name: merge_tensor(name, [m[name] for m in models]) if tensor.is_floating_point() else tensor
        for name, tensor in first.items()
    }


def _check_models(models: Sequence[StateDict], base: StateDict | None = None) -> None:
    if not models:
        raise MergeError("a merge needs at least one model")
    named = {f"model {i}": m for i, m in enumerate(models)}
    if base is not None:
        named = {"base": base, **named}
    check_compatible(named)


def _weights_for(weights: TensorWeights, name: str, n_models: int) -> Sequence[float]:
    if isinstance(weights, Mapping):
        if name not in weights:
            raise MergeError(f"the per-tensor weights have no entry for tensor {name!r}")
        weights = weights[name]
    _check_weight_count(weights, n_models, name)
    return weights


def _fraction_for(t: float | Mapping[str, float], name: str) -> float:
    if isinstance(t, Mapping):
        if name not in t:
            raise MergeError(f"the per-tensor slerp fractions have no entry for tensor {name!r}")
        return t[name]
    return t


def _check_weight_count(weights: Sequence[float], n_models: int, name: str | None = None) -> None:
    if len(weights) != n_models:
        where = f" for tensor {name!r}" if name else ""
        raise MergeError(f"got {len(weights)} weights{where} for {n_models} models")


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise MergeError(f"density must be in (0, 1], got {density}")


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _lerp(x: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    return (1.0 - t) * x + t * y
