"""Per-sample dynamic LoRA: ``y = W x + s * up_b(down_b(x))`` for batch row b.

Shape legend: b rows of a host batch, n tokens, i in_features, o out_features, r rank; for a Conv2d
target c input channels, (kh, kw) its kernel, i = c * kh * kw.
Factor naming follows ComfyUI/kohya and peft: ``down`` is (r, i), ``up`` is (o, r), ``scale =
alpha / rank * strength``. The paper writes ΔW = B·A, so B = up and A = down.

Two ways to apply it, with the same result:

- Forward hooks on the base Linear modules (:func:`hooked`) add each row's delta to that row's output.
  They never touch weights, so fp8/fp16/bf16/fp32 base layers, ComfyUI's manual-cast and low-VRAM
  paths and training all share one code path: :func:`add_lora_delta` (reference: :func:`lora_delta`).
  Hooks read a mutable :class:`LoRAState`, so they can be re-pointed at new factors cheaply.
  A Conv2d target takes LoCon's form: ``down`` is a (r, c, kh, kw) kernel applied with the layer's own
  stride, padding and dilation (one grouped convolution serves every row's kernel), ``up`` a 1x1 (o, r).
- When every row of a call shares one LoRA (one sample), :func:`fused_weights` merges it into new
  weight tensors and :func:`swapped_weights` points the modules at them for the duration of a call.
  The original weight tensors are never written: they go back in place on exit, even on an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .targets import Target

# target id -> (down (b, r, i), up (b, o, r)), one row per sample
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _check_factor_batch(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> None:
    b = x.shape[0]
    if down.shape[0] != b or up.shape[0] != b:
        raise ValueError(f"factor batch {down.shape[0]} does not match input batch {b}")


def _check_factor_shapes(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> None:
    _check_factor_batch(x, down, up)
    i = x.shape[-1]
    if down.shape[-1] != i:
        raise ValueError(f"factor in_features {down.shape[-1]} does not match input features {i}")


def lora_delta(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The low-rank update for each row of `x` (b, ..., i) -> (b, ..., o), in the factors' dtype."""
    _check_factor_shapes(x, down, up)
    b, i = x.shape[0], x.shape[-1]
    flat = x.reshape(b, -1, i).to(down.dtype)  # (b, n, i)
    hidden = torch.bmm(flat, down.transpose(1, 2))  # (b, n, r)
    delta = torch.bmm(hidden, up.transpose(1, 2))  # (b, n, o)
    return (delta * scale).reshape(*x.shape[:-1], up.shape[1])


@dataclass(frozen=True)
class ConvGeometry:
    """How a Conv2d target slides its kernel; a LoCon delta uses the layer's own geometry."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, module: nn.Module) -> ConvGeometry:
        return cls(*(tuple(getattr(module, name)) for name in ("kernel_size", "stride", "padding", "dilation")))

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(size, self.kernel, self.stride, self.padding, self.dilation)
        )


def conv_geometry(target: Target, module: nn.Module) -> ConvGeometry | None:
    """The geometry a convolution target's delta slides with (its module's own); None for a Linear target."""
    return ConvGeometry.of(module) if target.kernel is not None else None


def conv_lora_delta(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float, geometry: ConvGeometry
) -> torch.Tensor:
    """The LoCon update for each row of `x` (b, c, h, w) -> (b, o, h', w'), in the factors' dtype: row b's
    (r, c*kh*kw) down factor as a kernel, by one convolution grouped by row, then its (o, r) up factor."""
    _check_factor_batch(x, down, up)
    b, c = x.shape[:2]
    r, (kh, kw) = down.shape[1], geometry.kernel
    if down.shape[-1] != c * kh * kw:
        raise ValueError(f"factor in_features {down.shape[-1]} does not match {c} channels x kernel {kh}x{kw}")
    hidden = F.conv2d(
        x.reshape(1, b * c, *x.shape[2:]).to(down.dtype),
        down.reshape(b * r, c, kh, kw),
        stride=geometry.stride,
        padding=geometry.padding,
        dilation=geometry.dilation,
        groups=b,
    )  # (1, b*r, h', w')
    delta = torch.bmm(up, hidden.reshape(b, r, -1))  # (b, o, h'*w')
    return (delta * scale).reshape(b, up.shape[1], *hidden.shape[2:])


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def add_lora_delta(
    output: torch.Tensor,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    out_slice: tuple[int, int] | None = None,
    geometry: ConvGeometry | None = None,
) -> torch.Tensor:
    """`output` (b, ..., o) plus each row's LoRA update of `x`, in its `out_slice` rows when given; for a convolution
    target (`geometry` given), the LoCon update of :func:`conv_lora_delta`, added in place when nothing needs
    gradients.

    At inference (nothing needs gradients, one dtype) the update goes straight into `output` in one
    ``baddbmm_``: no (b, n, o) delta is allocated, scaled or added. Otherwise it is :func:`lora_delta`
    cast to the output's dtype and added (in place only into a fused layer's slice, which a Linear's
    backward does not need).
    """
    if geometry is not None:
        delta = conv_lora_delta(x, down, up, scale, geometry).to(output.dtype)
        return output + delta if _needs_autograd(output, x, down, up) else output.add_(delta)
    fast = output.dtype == down.dtype == up.dtype and output.is_contiguous()
    if not fast or _needs_autograd(output, x, down, up):
        delta = lora_delta(x, down, up, scale).to(output.dtype)
        if out_slice is None:
            return output + delta
        output[..., out_slice[0] : out_slice[1]] += delta
        return output
    _check_factor_shapes(x, down, up)
    b, i = x.shape[0], x.shape[-1]
    hidden = torch.bmm(x.reshape(b, -1, i).to(down.dtype), down.transpose(1, 2))  # (b, n, r)
    rows = output.view(b, -1, output.shape[-1])
    if out_slice is not None:
        rows = rows[..., out_slice[0] : out_slice[1]]
    rows.baddbmm_(hidden, up.transpose(1, 2), alpha=scale)
    return output


def rows_to_samples(num_rows: int, num_samples: int) -> torch.Tensor:
    """Sample index of each host-batch row, ComfyUI's chunk-major layout: row r is sample r % B.

    Under CFG a host batch holds the cond and the uncond chunk of the same B samples; both chunks
    of a sample get that sample's LoRA.
    """
    if num_samples <= 0 or num_rows % num_samples:
        raise ValueError(
            f"HyperAlign: a model call with {num_rows} rows cannot be split into chunks of {num_samples} "
            "samples. HINT: batch layouts that slice the batch axis (context windows) are not supported."
        )
    return torch.arange(num_rows) % num_samples


def merged_weight(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + s * up @ down`` for one sample's factors (r, i) and (o, r), reshaped to a convolution's kernel:
    the reference for the fuse path."""
    return weight + scale * (up.to(weight.dtype) @ down.to(weight.dtype)).reshape(weight.shape)


@dataclass
class LoRAState:
    """What the hooks read. ``factors`` is None between model calls: hooks then add nothing."""

    scale: float = 1.0
    factors: Factors | None = None
    calls: int = 0  # hooked forwards that added a delta, for tests and summaries
    _bound: Factors = field(default_factory=dict, repr=False)

    def bind(self, factors: Factors, row_index: torch.Tensor | None = None, device=None) -> None:
        """Expand per-sample factors to the rows of the coming model call (once per call, not per layer)."""
        bound, index = {}, row_index
        for key, (down, up) in factors.items():
            if device is not None and down.device != torch.device(device):
                down, up = down.to(device, non_blocking=True), up.to(device, non_blocking=True)
            if row_index is not None:
                if index.device != down.device:  # one copy for all targets, not one per target
                    index = row_index.to(down.device)
                down, up = down.index_select(0, index), up.index_select(0, index)
            bound[key] = (down, up)
        self._bound = bound
        self.factors = factors

    def clear(self) -> None:
        self.factors, self._bound = None, {}

    def for_target(self, target_id: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._bound.get(target_id) if self.factors is not None else None


def _make_hook(target: Target, state: LoRAState, out_slice: tuple[int, int] | None, geometry: ConvGeometry | None):
    def hook(module, args, output):
        pair = state.for_target(target.id)
        if pair is None:
            return None
        down, up = pair
        try:
            output = add_lora_delta(output, args[0], down, up, state.scale, out_slice, geometry)
        except ValueError as err:
            raise ValueError(f"{err} at target {target.id!r}") from None
        state.calls += 1
        return output

    return hook


def _check_conv(target: Target, module: nn.Module, path: str) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Conv2d) or weight is None or weight.dim() != 4:
        raise TypeError(
            f"HyperAlign: {path!r} is a {type(module).__name__}, not a Conv2d layer. HINT: models replaced by "
            "TensorRT-style or other fused implementations cannot take HyperAlign's LoRA."
        )
    expected = (target.out_features, target.in_channels, *target.kernel)
    if tuple(weight.shape) != expected or module.groups != 1 or module.padding_mode != "zeros":
        raise ValueError(
            f"HyperAlign: convolution {path!r} has weight shape {tuple(weight.shape)} (groups {module.groups}, "
            f"padding {module.padding_mode!r}), but the predictor expects {expected} with groups 1 and zero padding. "
            "HINT: the predictor was trained for a different architecture."
        )


def check_module(target: Target, module: nn.Module, path: str) -> None:
    if target.kernel is not None:
        _check_conv(target, module, path)
        return
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise TypeError(
            f"HyperAlign: {path!r} is a {type(module).__name__}, not a Linear layer. HINT: models replaced by "
            "TensorRT-style or other fused implementations cannot take HyperAlign's LoRA."
        )
    # a fused layer only needs room for its slice; a plain one must match exactly, or the delta would not add
    fused = fused_slice(target, module) is not None
    out_features = target.out_slice[1] if fused else target.out_features
    if weight.shape[1] != target.in_features or (
        weight.shape[0] < out_features if fused else weight.shape[0] != out_features
    ):
        raise ValueError(
            f"HyperAlign: layer {path!r} has weight shape {tuple(weight.shape)}, but the predictor expects "
            f"in_features {target.in_features} and {'at least' if fused else 'exactly'} {out_features} outputs. "
            "HINT: the predictor was trained for a different architecture."
        )


def fused_slice(target: Target, module: nn.Module) -> tuple[int, int] | None:
    """The rows of `module`'s output that `target` adds to: its out_slice when `module` is ComfyUI's fused layer
    (FLUX qkv, linear1), None when `module` is exactly the target's width (the same row's diffusers Linear)."""
    if target.out_slice is None or module.weight.shape[0] == target.out_features:
        return None
    return target.out_slice


def resolve_modules(root: nn.Module, targets: list[Target], path_of) -> list[tuple[Target, str, nn.Module]]:
    """Find each target's module under `root` (`path_of(target)` is the host's path), checking its shape."""
    found, missing = [], []
    for target in targets:
        path = path_of(target)
        try:
            module = root.get_submodule(path)
        except AttributeError:
            missing.append(path)
            continue
        check_module(target, module, path)
        found.append((target, path, module))
    if missing:
        raise ValueError(
            f"HyperAlign: {len(missing)} of {len(targets)} target layers are missing from the model, e.g. "
            f"{missing[:3]}. HINT: connect a plain model of the predictor's family (no TensorRT or fused replacement)."
        )
    return found


@contextmanager
def hooked(resolved: list[tuple[Target, str, nn.Module]], state: LoRAState) -> Iterator[LoRAState]:
    """Install one forward hook per target (from :func:`resolve_modules`); always removed on exit."""
    handles = []
    try:
        for target, _path, module in resolved:
            hook = _make_hook(target, state, fused_slice(target, module), conv_geometry(target, module))
            handles.append(module.register_forward_hook(hook))
        yield state
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------- fused weights

FUSIBLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fp8 and quantised weights keep the hooks


def fusible_weight(module: nn.Module) -> bool:
    """Whether `module`'s weight is a plain float Parameter that can be swapped for a merged copy."""
    weight = module._parameters.get("weight")
    return type(weight) is nn.Parameter and weight.dtype in FUSIBLE_DTYPES  # not a subclass: quantised formats


def merge_weights(
    weight: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]], scale: float
) -> torch.Tensor:
    """A new tensor: `weight` plus ``scale * up @ down`` of each (down (r, i), up (o, r), out_slice) in its rows.

    `weight` is only read. The sum is formed in fp32 and rounded once to the weight's dtype, so fp16/bf16
    weights lose nothing to the merge beyond that rounding. A convolution's (o, c, kh, kw) weight is merged as
    its (o, c*kh*kw) matrix: the layout of a LoCon down factor.
    """
    flat = weight.detach().reshape(weight.shape[0], -1)
    if weight.dtype == torch.float32 and len(parts) == 1 and parts[0][2] is None:
        down, up, _ = parts[0]  # the common case in one pass: fresh memory is written once, not copied then updated
        return torch.addmm(flat, up.to(weight), down.to(weight), alpha=scale).reshape(weight.shape)
    merged = flat.to(torch.float32, copy=True)
    for down, up, out_slice in parts:
        rows = merged if out_slice is None else merged[out_slice[0] : out_slice[1]]
        rows.addmm_(up.to(merged), down.to(merged), alpha=scale)
    return merged.to(weight.dtype).reshape(weight.shape)


def fused_weights(
    resolved: list[tuple[Target, str, nn.Module]], factors: Factors, sample: int, scale: float, fusible=fusible_weight
) -> tuple[dict[nn.Module, nn.Parameter], list[tuple[Target, str, nn.Module]]]:
    """Merge sample `sample`'s LoRA into a copy of each fusible target module's weight.

    Targets that share a module (FLUX's fused qkv and linear1 slices) go into one merged weight, each in its
    own rows. Returns ({module: merged Parameter}, the resolved rows left to the hook path).
    """
    groups: dict[nn.Module, list] = {}
    rest = []
    for target, path, module in resolved:
        if not fusible(module):
            rest.append((target, path, module))
            continue
        down, up = factors[target.id]
        groups.setdefault(module, []).append((down[sample], up[sample], fused_slice(target, module)))
    merged = {
        module: nn.Parameter(merge_weights(module.weight, parts, scale), requires_grad=False)
        for module, parts in groups.items()
    }
    return merged, rest


@contextmanager
def swapped_weights(merged: dict[nn.Module, nn.Parameter]) -> Iterator[None]:
    """Point each module's weight at its merged Parameter; the original Parameter objects go back on exit,
    also on an exception or an interrupt.

    Nothing is written into the original tensors, so a model whose weights other ModelPatchers share
    stays bit-identical. The parameter table is set directly (not through ``setattr``): this runs twice
    per model call for every fused module, and ``nn.Module.__setattr__`` costs microseconds each time.
    """
    originals = []
    try:
        for module, weight in merged.items():
            originals.append((module, module._parameters["weight"]))
            module._parameters["weight"] = weight
        yield
    finally:
        for module, original in reversed(originals):
            module._parameters["weight"] = original


# ---------------------------------------------------------------------------------- statistics


def _frobenius_inner(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """<up_a @ down_a, up_b @ down_b>_F per sample, through (r, r) Gram matrices: never forms ΔW."""
    (down_a, up_a), (down_b, up_b) = a, b
    gram_up = torch.bmm(up_a.transpose(1, 2).float(), up_b.float())  # (b, r, r)
    gram_down = torch.bmm(down_a.float(), down_b.transpose(1, 2).float())  # (b, r, r)
    return (gram_up * gram_down).sum(dim=(1, 2))  # (b,)


def factor_stats(factors: Factors, reference: Factors) -> dict:
    """LoRA dynamics against a reference (the first prediction of a run), paper Fig. 8.

    Sums over targets, means over samples: `norm` = ||ΔW||, `cosine` = cos(ΔW, ΔW_ref),
    `relative_change` = ||ΔW - ΔW_ref|| / ||ΔW_ref||.
    """
    self_sq = ref_sq = cross = 0.0
    for key, pair in factors.items():
        ref = reference[key]
        self_sq = self_sq + _frobenius_inner(pair, pair)
        ref_sq = ref_sq + _frobenius_inner(ref, ref)
        cross = cross + _frobenius_inner(pair, ref)
    norm, ref_norm = self_sq.clamp_min(0).sqrt(), ref_sq.clamp_min(0).sqrt()
    cosine = cross / (norm * ref_norm).clamp_min(1e-12)
    change = (self_sq + ref_sq - 2 * cross).clamp_min(0).sqrt() / ref_norm.clamp_min(1e-12)
    return {
        "norm": float(norm.mean()),
        "cosine": float(cosine.mean()),
        "relative_change": float(change.mean()),
    }
