"""WSConv1d/2d/3d: ``nn.ConvNd`` whose weight is standardized before every use.

Same constructor arguments and state dict as ``nn.ConvNd``, plus ``eps``,
``correction``, ``eps_mode`` and ``standardize`` ("full", or "center": W_hat = W - mean,
centering only) (see ``wsbcn.functional.weight_standardize``). A centering-only layer
standardizes per layer, also under a ModelWeightStandardizer. A subclass whose forward
computes the conv itself passes ``self.standardized_weight()``, not ``self.weight``.
"""
import math

import torch
from torch import nn

from .. import checks
from ..ops.ws import check_standardize, weight_standardize
from .tracing import Proxy, fx_leaf, refuse_script


def _check_before_init(dims, in_channels, out_channels, kernel_size, groups, dtype, eps, correction, eps_mode,
                       standardize):
    """The WS arguments checked before nn.ConvNd's __init__ draws the initial weight, so
    a rejected call leaves the random generator as it was (nn.ConvNd's own argument
    errors come first there too). The fan-in checks need the weight's shape: checked
    here when the conv arguments give it, else after __init__ (``_init_ws``)."""
    checks.check_factory_dtype(f"WSConv{dims}d's weight", dtype)
    shape = None
    try:
        kernel = tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * dims
        if len(kernel) == dims and all(type(v) is int for v in (in_channels, out_channels, groups, *kernel)) \
                and groups > 0 and in_channels % groups == 0:
            shape = (out_channels, in_channels // groups, *kernel)
    except TypeError:  # nn.ConvNd names what is wrong with its arguments
        pass
    checks.check_ws_scalars(eps, correction, eps_mode, shape)
    check_standardize(standardize)
    if shape is not None:
        _check_fan_in(dims, shape)


def _check_fan_in(dims, shape):
    """A layer whose filters hold one element each is refused: standardized, each is 0
    whatever its value, with no gradient, so the conv would output its bias alone (as a
    norm of one value per group, ops/norm.py). weight_standardize itself computes those
    zeros."""
    if math.prod(shape[1:]) == 1:
        raise ValueError(f"WSConv{dims}d with a fan-in of 1 (weight shape {tuple(shape)}: one element per filter): "
                         "standardized, every filter is 0 whatever its value, with no gradient, and the conv would "
                         "output its bias alone; use a plain conv there")


class _WSConvMixin:
    # a weak reference to the wsbcn.ModelWeightStandardizer covering this layer, if any
    # (ops/ws_model.py: the model's hooks hold it; a strong one here would be a cycle)
    _ws_model_ref = None

    @property
    def _ws_model(self):
        """The ModelWeightStandardizer covering this layer, or None."""
        ref = self._ws_model_ref
        return None if ref is None else ref()

    standardize = "full"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 eps: float = 1e-5, correction: int = 0, eps_mode: str = "var", standardize: str = "full"):
        # nn.ConvNd's arguments by name, so that what reads the signature sees them (skip_init: device)
        _check_before_init(self._dims, in_channels, out_channels, kernel_size, groups, dtype, eps, correction,
                           eps_mode, standardize)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_ws(eps, correction, eps_mode, standardize)

    def __getstate__(self):
        # deepcopy and pickle leave the model-wide standardizer out: a copy of the model
        # copies it through the model's hooks and links the copied layers (ops/ws_model.py)
        state = super().__getstate__()
        state.pop("_ws_model_ref", None)
        state.pop("_ws_model_index", None)
        return state

    def _init_ws(self, eps, correction, eps_mode, standardize="full"):
        self.eps, self.correction = checks.check_ws_args(self.weight, eps, correction, eps_mode)
        _check_fan_in(self._dims, self.weight.shape)
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
        ref = self._ws_model_ref
        standardizer = None if ref is None else ref()
        if standardizer is not None:  # standardized model-wide for this forward: taken once
            w_hat = standardizer.take(self, weight)
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
    _dims = 1


class WSConv2d(_WSConvMixin, nn.Conv2d):
    _dims = 2


class WSConv3d(_WSConvMixin, nn.Conv3d):
    _dims = 3
