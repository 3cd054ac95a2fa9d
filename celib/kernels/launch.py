"""Host side of the kernels: shapes, strides, launch configurations, and the three launches.

Internal to ``celib.kernels``: the names in ``__all__`` are the ones its autograd
Function, the chunk engine (:mod:`celib._chunks`), the tools in :mod:`celib.kernels.tools`, the GPU
benchmark and chapter 5 use; :class:`Tuning` and :func:`tuned` are documented in
the API reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
import torch

from celib._options import LossOptions
from celib.errors import InputError
from celib.kernels import _mode

__all__ = ["MAX_BLOCK", "MAX_BLOCK_HEAVY", "STREAM_BLOCK_HEAVY", "Forward", "Launch", "Tuning", "as_rows",
           "backward", "block_size", "forward", "max_block_for", "num_warps", "plan_backward", "plan_forward",
           "scale_", "tuned", "tuning"]

#: Largest block of logits one program holds; longer rows are streamed in blocks of this size.
#: Rows up to this length are read once (forward + backward), longer ones twice. Every configuration in
#: the table of ``python -m celib.kernels.tools.resources`` (each option alone, and all of them with
#: probability targets and with index targets) compiles without spilling up to it for sm_80, sm_90a and
#: sm_100a, as ``tests/test_tools_resources.py`` checks; other combinations of options are not checked;
#: see ``max_block_for`` and ``STREAM_BLOCK_HEAVY`` for the options that need less. Provisional: see
#: :class:`Tuning`.
MAX_BLOCK = 16384
#: The largest one-block row when probability targets or soft-capping are on (more values live per logit).
MAX_BLOCK_HEAVY = 8192
#: The block of a *streamed* row (longer than its one-block limit) with probability targets or
#: soft-capping, at 8 warps: 16 values of a row per thread. At 32 per thread (MAX_BLOCK_HEAVY at 8 warps)
#: the streamed forward with index targets and weight + smoothing + z-loss + soft-capping spills on
#: sm_90a, and at MAX_BLOCK_HEAVY with 16 warps it spills on sm_100a (the compile table).
STREAM_BLOCK_HEAVY = 4096


@dataclass(frozen=True)
class Tuning:
    """The launch choices that only a GPU's clock can settle, **provisional** until
    ``benchmarks/gpu_check.py`` has timed them on one (it times each alternative; no GPU has run it yet).

    Attributes:
        max_block: the one-block limit: rows up to it are read once, longer rows are streamed.
            16384 compiles without spilling, but so does 32768 (chapter 5 prints its resources),
            which would read 32k vocabularies (Llama 2, Mistral) once instead of twice.
        num_warps: warps per program; None for :func:`num_warps`' rule.
        two_sweeps: the design for streamed rows. False, the split design (flash-attention's): the
            forward kernel writes only the row statistics and the backward kernel re-reads the row.
            True, the same-program design (Liger-Kernel's): the forward program sweeps its row a
            second time at once and writes the gradient at upstream 1, and backward moves nothing at
            upstream 1. Both move 2 reads + 1 write per logit at upstream 1 (at another upstream the
            same-program design moves 3 R + 2 W, the split one still 2 R + 1 W); the same-program
            second read can come from L2, its row having just been read, which is why its grid is
            persistent (``programs``).
        programs: programs of the same-program design's persistent grid, each taking rows pid,
            pid + programs, ...; so at most this many rows are in flight. None: as many rows as fit
            in half the GPU's L2 cache, at least one per SM (on a CPU: one program per row).
    """

    max_block: int = MAX_BLOCK
    num_warps: int | None = None
    two_sweeps: bool = False
    programs: int | None = None


_tuning = Tuning()


def tuning() -> Tuning:
    """The launch choices in force (see :class:`Tuning`)."""
    return _tuning


@contextlib.contextmanager
def tuned(**changes) -> Iterator[Tuning]:
    """Launch with other choices inside a ``with`` block, e.g. ``tuned(max_block=32768, num_warps=8)``;
    for ``benchmarks/gpu_check.py`` and the tests. Not thread-safe: a process-wide setting."""
    global _tuning
    before = _tuning
    new = dataclasses.replace(before, **changes)
    if new.max_block < 1 or new.max_block & (new.max_block - 1):
        raise InputError(f"max_block must be a power of two, got {new.max_block}.")
    _tuning = new
    try:
        yield new
    finally:
        _tuning = before


def _heavy(probability_target: bool, softcap: bool) -> bool:
    return probability_target or softcap


def max_block_for(probability_target: bool, softcap: bool, limit: int | None = None) -> int:
    """The largest block for a call: the one-block limit ``limit`` (None: :data:`MAX_BLOCK` unless
    :func:`tuned`), or at most :data:`MAX_BLOCK_HEAVY` with probability targets or soft-capping, which
    keep more values live (with every option on, a 16384 block at 16 warps spills on sm_100a: the
    compile table)."""
    limit = limit or _tuning.max_block
    return min(limit, MAX_BLOCK_HEAVY) if _heavy(probability_target, softcap) else limit


def num_warps(block: int) -> int:
    """Warps per program for a block of ``block`` logits: one per 1024 logits, at least 4 and at most 16
    (2048 and 4096: 4; 8192: 8; 16384: 16; so 16 or 32 values of a row per thread).

    Chosen from the compile table (``python -m celib.kernels.tools.resources``; chapter 5 prints the
    trade-off): more warps mean fewer registers per thread but more instructions per logit for the
    block reductions; fewer warps hold more values per thread, and with every option on they spill.
    Provisional: see :class:`Tuning`.
    """
    return max(4, min(16, block // 1024))


def _warps(block: int, heavy_streamed: bool = False, two_sweeps: bool = False) -> int:
    """:func:`num_warps`, or for a streamed row with the heavy options (see ``STREAM_BLOCK_HEAVY``)
    16 values per thread, 8 in the same-program design, whose two sweeps keep more values live (at 16
    it spills 8 bytes with every option on, with the oldest supported Triton: the compile table),
    unless :func:`tuned` fixes the warps."""
    if _tuning.num_warps:
        return _tuning.num_warps
    if heavy_streamed:
        return max(4, block // (256 if two_sweeps else 512))
    return num_warps(block)


def _programs(rows: int, row_bytes: int, device: torch.device) -> int:
    """The persistent grid of the same-program design (see :class:`Tuning`)."""
    if _tuning.programs is not None:
        return max(1, min(rows, _tuning.programs))
    if device.type != "cuda":
        return rows
    props = torch.cuda.get_device_properties(device)
    fit = props.L2_cache_size // 2 // max(1, row_bytes)
    return max(1, min(rows, max(props.multi_processor_count, fit)))


def block_size(num_classes: int, max_block: int | None = None, *, probability_target: bool = False,
               softcap: bool = False) -> int:
    """Power-of-two block: the whole row if it fits in :func:`max_block_for` the call's options and the
    one-block limit ``max_block`` (None: the one in force), else that cap, or ``STREAM_BLOCK_HEAVY``
    for a streamed row with probability targets or soft-capping."""
    cap = max_block_for(probability_target, softcap, max_block)
    if num_classes > cap and _heavy(probability_target, softcap):
        cap = min(cap, STREAM_BLOCK_HEAVY)
    return min(_next_power_of_2(num_classes), cap)


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View logits (C,), (N, C) or (N, C, d1, ..., dk) as (N, C, S) without copying when possible."""
    if x.dim() == 1:
        return x.view(1, -1, 1) if x.is_contiguous() else x.reshape(1, -1, 1)
    inner = 1
    for size in x.shape[2:]:
        inner *= size
    return x.reshape(x.shape[0], x.shape[1], inner)


@dataclass
class Forward:
    """Results of the forward launch: per-row loss and lse (float32, (N*S,)); per-row statistics for
    the backward launch (float32, (3, N*S): m, log d, coef); the gradient (one-block rows) or None."""

    loss: torch.Tensor
    lse: torch.Tensor
    stats: torch.Tensor
    grad: torch.Tensor | None


@dataclass
class Launch:
    """One kernel launch, planned: which kernel, its grid, its arguments and compile-time flags.

    :mod:`celib.kernels.tools.resources` compiles exactly these (with the specialisation Triton's JIT applies
    to the arguments) to read the resources a real launch uses.
    """

    kernel: str
    grid: tuple[int, ...]
    args: dict  # the kernel's arguments by name
    constexprs: dict
    num_warps: int

    def run(self, device: torch.device) -> None:
        if self.grid[0]:
            with _mode.quiet(device):
                fn = getattr(_mode.kernel_module(), self.kernel)
                fn[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps)


def _row_args(prefix: str, t: torch.Tensor) -> dict:
    """A (N, C, S) tensor's pointer and strides as the kernels name them: ``<prefix>_ptr`` and
    ``stride_<p>n``, ``stride_<p>s``, ``stride_<p>c`` with p the prefix's first letter."""
    p = prefix[0]
    if (t.shape[1] - 1) * abs(t.stride(1)) >= 2**31:  # the kernels form offsets within a row in int32
        raise InputError(f"{prefix} has {t.shape[1]} classes {t.stride(1)} elements apart: offsets within a row "
                         f"would pass 2**31, which the kernel computes in 32 bits; pass a tensor whose class "
                         f"dimension is contiguous (e.g. .contiguous()), or backend='torch'.")
    return {f"{prefix}_ptr": t, f"stride_{p}n": t.stride(0), f"stride_{p}s": t.stride(2), f"stride_{p}c": t.stride(1)}


def _target_args(target: torch.Tensor) -> dict:
    """Index targets (N*S,) with their stride (a column ``t[:, 0]``, ``t[::2]`` or an expanded target is a
    view, not a copy); probabilities (N, C, S) with their strides."""
    if target.is_floating_point():
        return _row_args("target", target)
    return dict(target_ptr=target, stride_tn=target.stride(0), stride_ts=0, stride_tc=0)


def _weight(weight: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return weight.float().contiguous() if weight is not None else dummy  # a dummy pointer when unused


def _upstream_strides(upstream: torch.Tensor, n: int, s: int) -> tuple[torch.Tensor, int, int]:
    """The upstream gradient as (N, S) with its real strides: (0, 0) for a scalar (``mean``, ``sum``, or an
    expanded one as ``loss.sum().backward()`` sends), no copy unless its layout cannot be viewed so."""
    if upstream.dim() == 0:
        return upstream, 0, 0
    up = upstream.reshape(n, s)
    return up, up.stride(0), up.stride(1)


def plan_forward(logits, target, options: LossOptions, grad_scale, compute_grad, grad_out=None,
                 max_block=None) -> tuple[Launch, Forward]:
    """The forward launch and the tensors it writes (see :func:`forward`), without running it."""
    n, c, s = logits.shape
    rows, device = n * s, logits.device
    prob = target.is_floating_point()
    block = block_size(c, max_block, probability_target=prob, softcap=options.softcap is not None)
    single = block >= c
    two_sweeps = _tuning.two_sweeps and not single
    loss = torch.empty(rows, dtype=torch.float32, device=device)
    lse = torch.empty(rows, dtype=torch.float32, device=device)
    stats = torch.empty(3, rows, dtype=torch.float32, device=device)
    grad = None
    if compute_grad and (single or two_sweeps):
        grad = grad_out if grad_out is not None else torch.empty((n, c, s), dtype=logits.dtype, device=device)
    g = grad if grad is not None else logits  # never written without the gradient
    args = dict(**_row_args("logits", logits), **_target_args(target), weight_ptr=_weight(options.weight, loss),
                **_row_args("grad", g), loss_ptr=loss, lse_ptr=lse, stats_ptr=stats, grad_scale_ptr=grad_scale,
                n_rows=rows, n_inner=s, n_cols=c, **options.kernel_scalars())
    flags = dict(options.kernel_flags(prob), COMPUTE_GRAD=grad is not None, BLOCK=block, SINGLE_BLOCK=single,
                 TWO_SWEEPS=two_sweeps)
    grid = _programs(rows, c * logits.element_size(), device) if two_sweeps else rows
    warps = _warps(block, not single and _heavy(prob, options.softcap is not None), two_sweeps)
    return Launch("forward_kernel", (grid,), args, flags, warps), Forward(loss, lse, stats, grad)


def forward(logits, target, options: LossOptions, grad_scale, compute_grad, grad_out=None,
            max_block=None) -> Forward:
    """Run the forward kernel over every row.

    Args:
        logits: (N, C, S) view (see :func:`as_rows`), float16/bfloat16/float32, any strides.
        target: (N*S,) integer class indices, or (N, C, S) probabilities.
        options: the call's :class:`~celib._options.LossOptions` (its ``reduction`` is not read:
            ``grad_scale`` carries the mean's factor).
        grad_scale: () float32 device tensor multiplying every gradient row (1 / mean's denominator).
        compute_grad: write the gradient now, if the row fits in one block or ``tuning().two_sweeps``
            (else backward does).
        grad_out: where to write it ((N, C, S), e.g. the logits themselves); a new tensor if None.
    """
    _mode.check_device(logits)
    launch, out = plan_forward(logits, target, options, grad_scale, compute_grad, grad_out, max_block)
    launch.run(logits.device)
    return out


def plan_backward(logits, target, options: LossOptions, stats, grad_scale, upstream, grad_out=None,
                  max_block=None, skip_unit_upstream=False) -> tuple[Launch, torch.Tensor]:
    """The backward launch and the gradient it writes (see :func:`backward`), without running it."""
    n, c, s = logits.shape
    prob = target.is_floating_point()
    grad = grad_out if grad_out is not None else torch.empty((n, c, s), dtype=logits.dtype, device=logits.device)
    up, stride_un, stride_us = _upstream_strides(upstream, n, s)
    block = block_size(c, max_block, probability_target=prob, softcap=options.softcap is not None)
    # The z-loss reaches backward through the saved coefficient (stats), not as an option of its own.
    scalars = {k: v for k, v in options.kernel_scalars().items() if k != "z_loss"}
    flags = {k: v for k, v in options.kernel_flags(prob).items() if k != "HAS_Z_LOSS"}
    args = dict(**_row_args("logits", logits), **_target_args(target), weight_ptr=_weight(options.weight, stats),
                **_row_args("grad", grad), stats_ptr=stats, grad_scale_ptr=grad_scale, upstream_ptr=up,
                stride_un=stride_un, stride_us=stride_us, n_rows=n * s, n_inner=s, n_cols=c, **scalars)
    flags.update(SKIP_UNIT_UPSTREAM=skip_unit_upstream, BLOCK=block)
    heavy_streamed = block < c and _heavy(prob, options.softcap is not None)
    return Launch("backward_kernel", (n * s,), args, flags, _warps(block, heavy_streamed)), grad


def backward(logits, target, options: LossOptions, stats, grad_scale, upstream, grad_out=None, max_block=None,
             skip_unit_upstream=False) -> torch.Tensor:
    """The gradient from the logits and the forward kernel's statistics: grad_scale * upstream * dloss/dz.

    ``upstream`` is a () tensor (mean, sum) or of the batch shape (reduction="none"), any strides (an
    expanded, stride-0 one included). With ``skip_unit_upstream`` (``grad_out`` holds the gradient the
    forward kernel wrote at upstream 1), rows whose upstream gradient is exactly 1 are left as they are:
    the usual ``loss.backward()`` then moves no data.
    """
    launch, grad = plan_backward(logits, target, options, stats, grad_scale, upstream, grad_out, max_block,
                                 skip_unit_upstream)
    launch.run(logits.device)
    return grad


def scale_(grad: torch.Tensor, upstream: torch.Tensor, max_block=None) -> torch.Tensor:
    """grad (N, C, S) *= upstream (() or the batch shape, any strides) in place; nothing moves where it is 1.

    Only for ``inplace_backward``, where the logits are gone: the gradient is rounded a second time.
    """
    n, c, s = grad.shape
    up, stride_un, stride_us = _upstream_strides(upstream, n, s)
    block = block_size(c, max_block)
    args = dict(**_row_args("grad", grad), upstream_ptr=up, stride_un=stride_un, stride_us=stride_us,
                n_inner=s, n_cols=c)
    Launch("scale_kernel", (n * s,), args, dict(BLOCK=block), _warps(block)).run(grad.device)
    return grad
