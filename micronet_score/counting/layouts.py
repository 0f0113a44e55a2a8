"""The strides torch gives the outputs of elementwise ops and cat on the meta device, from the inputs' sizes and
strides alone.

On meta, torch computes these layouts with its Python reference implementations (0.1 to 0.3 ms an op, most of a
shape-only forward of a large model). The rules here are those references' (torch._prims_common, modelled on
TensorIterator), written over plain tuples:

- an input whose dtype is not the op's computation dtype (float16 and bfloat16 compute in float32) is converted
  first; a conversion keeps dense strides and lays a non-dense tensor out densely in its own dimension order;
- the inputs are broadcast (expand: a new or stretched dim has stride 0; a new leading dim of size 1 the stride
  of the dim it stands on times that dim's size);
- the output's dimension order: the identity when every input is contiguous (and not all channels-last), NCHW ->
  NHWC when every input is channels-last (and not all contiguous), else an insertion sort from the innermost dim
  out that moves a dim inwards when the first input with nonzero strides on both dims has a smaller stride on it
  (equal strides: the shorter dim inwards);
- the output is dense in that order.

Only tensors with no zero-size dim are handled here (torch's rules for empty tensors differ between kernels):
callers fall back to torch for those.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Sizes = tuple[int, ...]
Strides = tuple[int, ...]

LOW_PRECISION = (torch.float16, torch.bfloat16)


def computation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's references compute an elementwise op in (half precision is widened to float32)."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def dense_in_order(sizes: Sizes, order: Sequence[int]) -> Strides:
    """Dense strides laying the dims out in ``order`` (outermost first); a dim of size 1 advances nothing."""
    strides = [0] * len(sizes)
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= max(sizes[dim], 1)
    return tuple(strides)


def contiguous(sizes: Sizes) -> Strides:
    return dense_in_order(sizes, range(len(sizes)))


def _nested(sizes: Sizes, strides: Strides, inner_first: Sequence[int]) -> bool:
    """The dims, innermost first, each stride the product of the sizes inside it (dims of size 1 ignored)."""
    expected = 1
    for dim in inner_first:
        if sizes[dim] == 1:
            continue
        if strides[dim] != expected:
            return False
        expected *= sizes[dim]
    return True


def is_contiguous(sizes: Sizes, strides: Strides) -> bool:
    """Row-major, ignoring dims of size 1 (torch's compute_contiguous)."""
    return _nested(sizes, strides, range(len(sizes) - 1, -1, -1))


def is_channels_last(sizes: Sizes, strides: Strides) -> bool:
    """A 4-d tensor laid out NHWC, ignoring dims of size 1."""
    return len(sizes) == 4 and _nested(sizes, strides, (1, 3, 2, 0))


def is_dense(sizes: Sizes, strides: Strides) -> bool:
    """Non-overlapping and dense: some order of the dims is contiguous."""
    numel = 1
    for n in sizes:
        numel *= n
    if numel < 2:
        return True
    if len(sizes) == 1:
        return strides[0] == 1
    return _nested(sizes, strides, sorted(range(len(sizes)), key=lambda d: (strides[d], sizes[d])))


def like_channels_last(sizes: Sizes, strides: Strides) -> bool:
    """Strides that suggest channels-last memory to torch (suggest_memory_format), 4-d or 5-d."""
    if len(sizes) == 4:
        order = (1, 3, 2, 0)
    elif len(sizes) == 5:
        order = (1, 4, 3, 2, 0)
    else:
        return False
    if strides[1] == 0:
        return False
    least = 0
    for dim in order:
        if sizes[dim] == 0 or strides[dim] < least or (dim == 0 and least == strides[1]):
            return False
        least = strides[dim] * sizes[dim]
    return True


def broadcast(shapes: Sequence[Sizes]) -> Sizes | None:
    """The broadcast shape, or None when the shapes do not broadcast."""
    rank = max(len(s) for s in shapes)
    out = [1] * rank
    for shape in shapes:
        offset = rank - len(shape)
        for i, n in enumerate(shape):
            current = out[offset + i]
            if n != current:
                if current == 1:
                    out[offset + i] = n
                elif n != 1:
                    return None
    return tuple(out)


def expanded(sizes: Sizes, strides: Strides, target: Sizes) -> Strides:
    """The strides of ``expand(target)`` of a tensor of these sizes and strides."""
    out = [0] * len(target)
    offset = len(target) - len(sizes)
    inner_size, inner_stride = 1, 1
    for i in range(len(target) - 1, -1, -1):
        dim = i - offset
        stride = strides[dim] if dim >= 0 else inner_size * inner_stride
        size = sizes[dim] if dim >= 0 else 1
        if size != target[i]:
            stride = 0
        out[i] = stride
        inner_size, inner_stride = target[i], stride
    return tuple(out)


def order(sizes: Sizes, all_strides: Sequence[Strides]) -> list[int]:
    """The output's dimension order (outermost first) for inputs of these (broadcast) sizes and strides."""
    rank = len(sizes)
    if rank < 2:
        return list(range(rank))
    contiguous_all = all(is_contiguous(sizes, s) for s in all_strides)
    channels_last_all = all(is_channels_last(sizes, s) for s in all_strides)
    if contiguous_all and not channels_last_all:
        return list(range(rank))
    if channels_last_all and not contiguous_all:
        return [0, *range(2, rank), 1]

    def inwards(a: int, b: int) -> int:
        """1: dim b goes inside dim a; -1: a stays inside b; 0: no input says."""
        for strides in all_strides:
            sa, sb = strides[a], strides[b]
            if sa == 0 or sb == 0:
                continue
            if sa == sb:
                if sizes[b] >= sizes[a]:
                    continue
                return 1
            return -1 if sb > sa else 1
        return 0

    inner_first = list(range(rank - 1, -1, -1))
    for i in range(1, rank):
        moving = i
        for j in range(i - 1, -1, -1):
            verdict = inwards(inner_first[j], inner_first[moving])
            if verdict > 0:
                inner_first[j], inner_first[moving] = inner_first[moving], inner_first[j]
                moving = j
            elif verdict < 0:
                break
    return inner_first[::-1]


def preserved(sizes: Sizes, strides: Strides) -> Strides:
    """A copy's strides in the input's layout (dtype conversion, clone): kept when dense, else dense in the
    input's own dimension order."""
    if is_dense(sizes, strides):
        return strides
    return dense_in_order(sizes, order(sizes, [strides]))


def elementwise(inputs: Sequence[tuple[Sizes, Strides, bool]]) -> tuple[Sizes, Strides] | None:
    """The output sizes and strides of an elementwise op of tensors (sizes, strides, converted first), or None
    when they do not broadcast or one is empty."""
    sizes = broadcast([s for s, _, _ in inputs])
    if sizes is None or 0 in sizes:
        return None
    all_strides = []
    for shape, strides, converted in inputs:
        if 0 in shape:
            return None
        if converted:
            strides = preserved(shape, strides)
        if shape != sizes:
            strides = expanded(shape, strides, sizes)
        all_strides.append(strides)
    return sizes, dense_in_order(sizes, order(sizes, all_strides))
