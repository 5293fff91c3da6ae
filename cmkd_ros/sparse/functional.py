"""Gather-GEMM-scatter sparse convolution with a hand-written backward pass."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from . import native

if TYPE_CHECKING:                      # annotations only: coords imports this module
    from .coords import KernelMap


class SparseConvFunction(torch.autograd.Function):
    """``out[o] = sum over pairs (i, o, k) of feats[i] @ weight[k]``; weight ``(K, Cin, Cout)``."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
        feats = feats.contiguous()
        ctx.kmap = kmap
        ctx.save_for_backward(feats, weight)
        return _conv_forward(feats, weight, kmap)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        feats, weight = ctx.saved_tensors
        kmap = ctx.kmap
        grad_out = grad_out.contiguous()
        grad_feats = grad_weight = None
        if ctx.needs_input_grad[0]:
            # 1. dL/dx = the transposed convolution of dL/dy with W[k]^T (same blocks, same
            #    row-parallel scatter as the forward pass).
            grad_feats = _conv_forward(grad_out, weight.transpose(1, 2), kmap.transposed())
        if ctx.needs_input_grad[1]:
            # 2. dL/dW[k] = x[in rows]^T @ dL/dy[out rows], one batched GEMM over the blocks
            #    (padding slots read a zero gradient row), summed per kernel offset.
            grad_weight = torch.zeros_like(weight)
            if kmap.in_rows.numel():
                in_rows, out_rows, kernel_index = blocked_pairs(kmap)
                padded = torch.cat([grad_out, grad_out.new_zeros(1, grad_out.shape[1])])
                grads = padded.index_select(0, out_rows.view(-1)).view(*out_rows.shape, -1)
                inputs = feats.index_select(0, in_rows.view(-1)).view(*in_rows.shape, -1)
                grad_weight.index_add_(0, kernel_index, torch.bmm(inputs.transpose(1, 2), grads))
            if kmap.identity >= 0:
                grad_weight[kmap.identity] += torch.mm(feats.t(), grad_out)
        return grad_feats, grad_weight, None


_BLOCK_ROWS = 256  # pairs per batched GEMM block


def blocked_pairs(kmap: KernelMap):
    """The pairs cut into blocks of ``_BLOCK_ROWS`` rows, each within one offset group.

    Returns ``(in_rows, out_rows, kernel_index)``: ``(B, _BLOCK_ROWS)`` int64 rows (padding
    reads input row 0 and lands in output row ``num_out``, a discarded row) and ``(B,)`` weight
    slices.
    Cached on the map (not a dataclass field, so a transposed copy rebuilds it).
    """
    cached = kmap.__dict__.get('_blocked')
    if cached is not None:
        return cached
    source = kmap.transpose_source()
    if source is not None:
        # A transposed map: the source's blocks with inputs and outputs exchanged (padding
        # slots, marked by the source's discarded output row, re-aimed at this map's).
        src_in, src_out, kernel_index = blocked_pairs(source)
        pad = src_out == source.num_out
        kmap.__dict__['_blocked'] = (src_out.masked_fill(pad, 0),
                                     src_in.masked_fill(pad, kmap.num_out), kernel_index)
        return kmap.__dict__['_blocked']
    device = kmap.in_rows.device
    sizes = torch.tensor([b - a for a, b in zip(kmap.bounds[:-1], kmap.bounds[1:])],
                         dtype=torch.int64, device=device)
    starts = torch.tensor(kmap.bounds[:-1], dtype=torch.int64, device=device)
    blocks = (sizes + _BLOCK_ROWS - 1) // _BLOCK_ROWS
    # 1. Each block's group and its first position inside that group.
    block_group = torch.repeat_interleave(torch.arange(len(kmap.kernel_index), device=device),
                                          blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    block_offset = (torch.arange(block_group.numel(), device=device)
                    - first_block[block_group]) * _BLOCK_ROWS
    # 2. Pair index of every slot; slots past the group's end point at a padding pair.
    position = block_offset[:, None] + torch.arange(_BLOCK_ROWS, device=device)[None]
    pair = torch.where(position < sizes[block_group][:, None],
                       starts[block_group][:, None] + position, kmap.in_rows.numel())
    pad = torch.tensor([0, kmap.num_out], dtype=torch.int64, device=device)
    in_rows = torch.cat([kmap.in_rows, pad[:1]])[pair]
    out_rows = torch.cat([kmap.out_rows, pad[1:]])[pair]
    kernel_index = torch.tensor(kmap.kernel_index, dtype=torch.int64, device=device)[block_group]
    kmap.__dict__['_blocked'] = (in_rows, out_rows, kernel_index)
    return kmap.__dict__['_blocked']


def _conv_forward(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap,
                  bias: torch.Tensor | None = None, feats2: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """``relu(conv([feats | feats2]) + bias + residual)`` without gradients (the compiled
    kernels fuse all of it; the reference path runs it step by step)."""
    kernels = _native_kernels(feats)
    if kernels is not None:  # the compiled fused gather-GEMM-scatter
        pin, pout, seg, block = native_layout(kmap)
        return kernels.conv_forward(feats, feats2, weight, bias, residual, pin, pout, seg,
                                    kmap.num_in, kmap.num_out, block, kmap.identity, relu)
    if feats2 is not None:
        feats = torch.cat([feats, feats2], dim=1)
    out = _reference_conv(feats, weight, kmap, bias)
    if residual is not None:
        out.add_(residual)  # a fresh buffer: in place is safe
    return out.relu_() if relu else out


def _reference_conv(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    cout = weight.shape[2]
    if not kmap.in_rows.numel():
        if kmap.identity >= 0:
            if bias is not None:
                return torch.addmm(bias, feats, weight[kmap.identity])
            return torch.mm(feats, weight[kmap.identity])
        out = feats.new_zeros(kmap.num_out, cout)
        return out if bias is None else out.add_(bias)
    # 1. One batched GEMM over fixed-size blocks of pairs (few large calls instead of one small
    #    GEMM per offset); padding slots land in a discarded last output row.
    in_rows, out_rows, kernel_index = blocked_pairs(kmap)
    out = feats.new_empty(kmap.num_out + 1, cout)
    if kmap.identity >= 0 and bias is not None:
        torch.addmm(bias, feats, weight[kmap.identity], out=out[:-1])
    elif kmap.identity >= 0:
        torch.mm(feats, weight[kmap.identity], out=out[:-1])
    elif bias is not None:
        out[:-1].copy_(bias.expand(kmap.num_out, cout))
    else:
        out[:-1].zero_()
    out[-1].zero_()
    gathered = feats.index_select(0, in_rows.view(-1)).view(*in_rows.shape, feats.shape[1])
    prod = torch.bmm(gathered, weight.index_select(0, kernel_index)).view(-1, cout)
    scatter = scatter_matrix(kmap, prod.dtype) if prod.device.type == 'cpu' else None
    if scatter is not None:
        out[:-1].addmm_(scatter, prod)  # sparse (N_out, slots) x products, in place
    else:
        out.index_add_(0, out_rows.view(-1), prod)
    return out[:-1]


NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what the compiled convolution takes


def _native_kernels(feats: torch.Tensor):
    """The compiled kernels when they can run this convolution (CPU, float32 or bfloat16)."""
    if feats.device.type != 'cpu' or feats.dtype not in NATIVE_DTYPES:
        return None
    return native.module()


def native_layout(kmap: KernelMap):
    """The pairs of ``kmap`` regrouped by (block of output rows, kernel offset) for the
    compiled convolution: ``(in rows, out rows)`` int32, segment starts int64 and the rows
    per block. Cached on the map; None when the compiled kernels are unavailable."""
    cached = kmap.__dict__.get('_native')
    if cached is None:
        kernels = native.module()
        if kernels is None:
            return None
        block = native.block_rows(kmap.num_out)
        cached = (*kernels.conv_layout(
            kmap.in_rows.cpu(), kmap.out_rows.cpu(), torch.tensor(kmap.bounds, dtype=torch.int64),
            torch.tensor(kmap.kernel_index, dtype=torch.int64), kmap.volume, kmap.num_in,
            kmap.num_out, block), block)
        kmap.__dict__['_native'] = cached
    return cached


CSR_DTYPES = (torch.float32, torch.float64)  # what the CPU sparse x dense product supports


def scatter_matrix(kmap: KernelMap, dtype: torch.dtype):
    """CSR ``(num_out, slots)`` of ones summing the blocked products into their output rows.

    On CPU this row-parallel sparse product is several times faster than ``index_add_`` (a
    serial scatter). Cached on the map per dtype; None for dtypes it does not support.
    """
    def build():
        out_rows = blocked_pairs(kmap)[1].view(-1)
        real = (out_rows < kmap.num_out).nonzero().squeeze(1)  # padding slots stay out
        return _row_csr(out_rows[real], real, kmap.num_out, out_rows.numel(), dtype)
    return _cached_csr(kmap, '_scatter', dtype, build)


def average_matrix(kmap: KernelMap, dtype: torch.dtype):
    """CSR ``(num_out, num_in)``: row o averages the inputs paired with output o (cached per
    dtype). In ``dtype`` where the CPU sparse product supports it, else in float32 (cast the
    16-bit features to it: the sum then also accumulates in float32)."""
    dtype = dtype if dtype in CSR_DTYPES else torch.float32
    return _cached_csr(kmap, '_average', dtype, lambda: _row_csr(
        kmap.out_rows, kmap.in_rows, kmap.num_out, kmap.num_in, dtype, average=True))


def _cached_csr(kmap: KernelMap, name: str, dtype: torch.dtype, build):
    """``build()`` cached on ``kmap`` under ``name`` per dtype; None for unsupported dtypes."""
    if dtype not in CSR_DTYPES:
        return None
    cache = kmap.__dict__.setdefault(name, {})
    if dtype not in cache:
        cache[dtype] = build()
    return cache[dtype]


def _row_csr(rows: torch.Tensor, columns: torch.Tensor, num_rows: int, num_columns: int,
             dtype: torch.dtype, average: bool = False) -> torch.Tensor:
    """CSR ``(num_rows, num_columns)`` with entry ``(rows[i], columns[i])`` equal to 1, or to
    1 / (entries in its row) with ``average``."""
    order = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=num_rows)
    crow = counts.new_zeros(num_rows + 1)
    torch.cumsum(counts, 0, out=crow[1:])
    if average:
        values = 1.0 / counts.clamp(min=1).to(dtype)[rows[order]]
    else:
        values = torch.ones(order.numel(), dtype=dtype, device=rows.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter('ignore', UserWarning)
        return torch.sparse_csr_tensor(crow, columns[order], values,
                                       size=(num_rows, num_columns), check_invariants=False)


def autocast_dtype(device_type: str):
    """The autocast dtype active for ``device_type``, or None."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        enabled = (torch.is_autocast_enabled() if device_type == 'cuda'
                   else torch.is_autocast_cpu_enabled())
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return (torch.get_autocast_gpu_dtype() if device_type == 'cuda'
                else torch.get_autocast_cpu_dtype())


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def sparse_conv(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap,
                bias: torch.Tensor | None = None, *, feats2: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """Sparse convolution ``(N_in, Cin) -> (N_out, Cout)`` over the pairs of ``kmap``, plus
    ``bias (Cout,)`` and ``residual (N_out, Cout)`` when given, then a ReLU with ``relu``.

    ``feats2 (N_in, Cin2)``: more input channels, as if concatenated to ``feats`` (the weight
    is ``(K, Cin + Cin2, Cout)``); the compiled kernels read both without concatenating.
    Under autocast, the tensors are cast to the autocast dtype first (the casts are
    differentiable), so forward and backward always see one dtype.
    """
    cin = feats.shape[1] + (0 if feats2 is None else feats2.shape[1])
    if weight.ndim != 3 or weight.shape[0] != kmap.volume or weight.shape[1] != cin:
        raise ValueError(f'weight {tuple(weight.shape)} does not fit {kmap.volume} kernel '
                         f'offsets and {cin} input channels')
    if feats.shape[0] != kmap.num_in or (feats2 is not None and feats2.shape[0] != kmap.num_in):
        raise ValueError(f'{feats.shape[0]} feature rows for {kmap.num_in} input coordinates')
    if residual is not None and tuple(residual.shape) != (kmap.num_out, weight.shape[2]):
        raise ValueError(f'residual {tuple(residual.shape)} does not fit {kmap.num_out} '
                         f'outputs of {weight.shape[2]} channels')
    device_type = feats.device.type
    dtype = autocast_dtype(device_type)
    if dtype is not None:
        def cast(t):
            return None if t is None else t.to(dtype)
        feats, weight, bias, feats2, residual = map(cast, (feats, weight, bias, feats2, residual))
        if not _needs_autograd(feats, weight, bias, feats2, residual) and _native_kernels(feats):
            # the compiled kernels are not autocast: no need to turn it off around them
            return _conv_forward(feats.contiguous(), weight, kmap, bias,
                                 None if feats2 is None else feats2.contiguous(), residual, relu)
        with torch.autocast(device_type, enabled=False):
            return sparse_conv(feats, weight, kmap, bias, feats2=feats2, residual=residual,
                               relu=relu)
    for name, t in (('weight', weight), ('feats2', feats2), ('residual', residual)):
        if t is not None and t.dtype != feats.dtype:
            raise ValueError(f'features are {feats.dtype} but {name} is {t.dtype}')
    if bias is not None and (bias.shape != (weight.shape[2],) or bias.dtype != feats.dtype):
        raise ValueError(f'bias {tuple(bias.shape)} {bias.dtype} does not fit '
                         f'{weight.shape[2]} output channels of {feats.dtype}')
    if _needs_autograd(feats, weight, bias, feats2, residual):
        if feats2 is not None:
            feats = torch.cat([feats, feats2], dim=1)
        out = SparseConvFunction.apply(feats, weight, kmap)
        if bias is not None:
            out = out + bias
        if residual is not None:
            out = out + residual
        return torch.relu(out) if relu else out
    # Inference: the bias initialises the output buffer (no extra pass).
    return _conv_forward(feats.contiguous(), weight, kmap, bias,
                         None if feats2 is None else feats2.contiguous(), residual, relu)
