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
