"""WSConv1d/2d/3d: ``nn.ConvNd`` whose weight is standardized before every use.

Same constructor arguments and state dict as ``nn.ConvNd``, plus ``eps``,
``correction``, ``eps_mode`` and ``standardize`` ("full", or "center": W_hat = W - mean,
centering only) (see ``wsbcn.functional.weight_standardize``). A centering-only layer
standardizes per layer, also under a ModelWeightStandardizer.
"""
import torch
from torch import nn

from .. import checks
from ..ops.ws import check_standardize, weight_standardize
from .tracing import Proxy, fx_leaf, refuse_script


class _WSConvMixin:
    _ws_model = None  # the wsbcn.ModelWeightStandardizer covering this layer, if any (ops/ws_model.py)

    standardize = "full"

    def _init_ws(self, eps, correction, eps_mode, standardize="full"):
        self.eps, self.correction = checks.check_ws_args(self.weight, eps, correction, eps_mode)
        self.eps_mode = eps_mode
        self.standardize = check_standardize(standardize)

    def standardized_weight(self) -> torch.Tensor:
        """W_hat of the current weight, recomputed on every call.

        Never cached: a write through ``weight.data`` (EMA updates, re-initialisation,
        ``conv.weight.data.copy_(...)``) leaves the version counter unchanged, so no
        cheap key proves a cached W_hat current. Inference that wants the standardization
        done once uses ``wsbcn.freeze``."""
        # _parameters["weight"] is what self.weight resolves to, without
        # nn.Module.__getattr__ (eager micro-batch layers are host-bound). A
        # parametrization (a property of a generated subclass), pruning or the hook
        # form of weight_norm / spectral_norm (a plain attribute a forward pre-hook
        # sets) takes "weight" out of _parameters: then self.weight is the weight.
        try:
            weight = self._parameters["weight"]
        except KeyError:
            weight = self.weight
        if self.standardize != "full":  # the model-wide kernels know full WS only
            return weight_standardize(weight, self.eps, self.correction, self.eps_mode, self.standardize)
        if self._ws_model is not None:  # standardized model-wide for this forward: taken once
            w_hat = self._ws_model.take(self, weight)
            if w_hat is not None:
                return w_hat
        return weight_standardize(weight, self.eps, self.correction, self.eps_mode)

    def forward(self, input):
        if isinstance(input, Proxy):  # torch.fx.symbolic_trace: a leaf (modules/tracing.py)
            return fx_leaf(self, input)
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    __prepare_scriptable__ = refuse_script

    def extra_repr(self):
        return super().extra_repr() + f", eps={self.eps}, correction={self.correction}, eps_mode={self.eps_mode!r}" + (
            f", standardize={self.standardize!r}" if self.standardize != "full" else "")


class WSConv1d(_WSConvMixin, nn.Conv1d):
    def __init__(self, *args, eps: float = 1e-5, correction: int = 0, eps_mode: str = "var",
                 standardize: str = "full", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_ws(eps, correction, eps_mode, standardize)


class WSConv2d(_WSConvMixin, nn.Conv2d):
    def __init__(self, *args, eps: float = 1e-5, correction: int = 0, eps_mode: str = "var",
                 standardize: str = "full", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_ws(eps, correction, eps_mode, standardize)


class WSConv3d(_WSConvMixin, nn.Conv3d):
    def __init__(self, *args, eps: float = 1e-5, correction: int = 0, eps_mode: str = "var",
                 standardize: str = "full", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_ws(eps, correction, eps_mode, standardize)
