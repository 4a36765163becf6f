"""Triton kernels and their launch wrappers (installed as ``wsbcn.kernels``).

Nothing here knows about autograd or ``torch.nn``; ``wsbcn`` builds on these.
Import this package only after ``TRITON_INTERPRET`` has been decided
(``wsbcn.backends`` does that), because triton reads it when kernels are defined.
"""
