"""WSConv1d/2d/3d: ``nn.ConvNd`` whose weight is standardized before every use.

Same constructor arguments and state dict as ``nn.ConvNd``, plus ``eps``,
``correction`` and ``eps_mode`` (see ``wsbcn.functional.weight_standardize``).
"""
import torch
from torch import nn

from .. import checks
from ..ws import weight_standardize


class _WSConvMixin:
    def _init_ws(self, eps, correction, eps_mode):
        self.eps, self.correction = checks.check_ws_args(self.weight, eps, correction, eps_mode)
        self.eps_mode = eps_mode
        self._w_hat_cache = None

    def standardized_weight(self) -> torch.Tensor:
        """W_hat. Reused without recomputation while no gradient is being
        recorded and the weight is unchanged (same tensor, same version)."""
        w = self.weight
        recording = torch.is_grad_enabled() and w.requires_grad
        if recording or torch.compiler.is_compiling():
            return weight_standardize(w, self.eps, self.correction, self.eps_mode)
        key = (w.data_ptr(), w._version, w.dtype, w.device, w.shape, self.eps, self.correction, self.eps_mode)
        cache = self._w_hat_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        w_hat = weight_standardize(w, self.eps, self.correction, self.eps_mode)
        self._w_hat_cache = (key, w_hat)
        return w_hat

    def forward(self, input):
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", eps={self.eps}, correction={self.correction}, eps_mode={self.eps_mode!r}"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_w_hat_cache"] = None  # derived data: never pickled or deep-copied
        return state


class WSConv1d(_WSConvMixin, nn.Conv1d):
    def __init__(self, *args, eps: float = 1e-5, correction: int = 0, eps_mode: str = "var", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_ws(eps, correction, eps_mode)


class WSConv2d(_WSConvMixin, nn.Conv2d):
    def __init__(self, *args, eps: float = 1e-5, correction: int = 0, eps_mode: str = "var", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_ws(eps, correction, eps_mode)


class WSConv3d(_WSConvMixin, nn.Conv3d):
    def __init__(self, *args, eps: float = 1e-5, correction: int = 0, eps_mode: str = "var", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_ws(eps, correction, eps_mode)
