"""Pure-Python helpers for the launch wrappers (no triton import).

Plain integer arithmetic on purpose: triton.cdiv and triton.next_power_of_2 are
ConstexprFunction objects whose calls cost microseconds each, and at micro-batch
sizes a layer's eager time is host time (perf/NOTES.md).
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def with_strides(t, stride):
    """A copy of ``t`` laid out with ``stride``, the layout a launch plan walks (a
    saved-tensor hook or a ``.data`` swap may give a tensor back in another). A dim of
    stride 0 (an expanded tensor) stays expanded."""
    sizes = [1 if st == 0 else n for n, st in zip(t.shape, stride)]
    return t.new_empty_strided(sizes, stride).copy_(t[tuple(slice(0, n) for n in sizes)]).expand(t.shape)


def contiguous(*tensors) -> tuple:
    """Each of ``tensors`` contiguous (``contiguous()`` gives a contiguous one back as it
    is), None kept: what the kernels index densely."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def nsc_strides(t):
    """Strides of ``t`` seen as (N, C, S) with the spatial dims flattened, or None
    when the spatial dims cannot be walked with one stride (then copy first).

    NCHW gives (C*S, S, 1); channels_last gives (S*C, 1, C); so do their 1d/3d kin.
    """
    spatial = [(size, st) for size, st in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    if not spatial:
        return t.stride(0), t.stride(1), 1
    expected = spatial[-1][1]
    for size, st in reversed(spatial):
        if st != expected:
            return None
        expected = st * size
    return t.stride(0), t.stride(1), spatial[-1][1]


def channels_fastest(t) -> bool:
    """True for channels_last-like layouts: the channel axis is the contiguous one."""
    st = nsc_strides(t)
    return st is not None and st[1] == 1 and t.shape[1] > 1
