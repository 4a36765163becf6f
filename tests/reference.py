"""Naive float64 references: the methods written out with plain torch ops, the way
the paper and the authors' released layers compute them. Never the closed form."""
import torch
import torch.nn.functional as F


def ws_reference(w: torch.Tensor, eps=1e-5, correction=0, eps_mode="var", dtype=torch.float64) -> torch.Tensor:
    flat = w.to(dtype).reshape(w.shape[0], -1)
    centered = flat - flat.mean(dim=1, keepdim=True)
    if eps_mode == "var":
        d = torch.sqrt(flat.var(dim=1, correction=correction, keepdim=True) + eps)
    else:
        d = flat.std(dim=1, correction=correction, keepdim=True) + eps
    return (centered / d).reshape(w.shape)


def conv_nd(x, w, bias, conv):
    """F.convNd with the geometry of module ``conv`` (padding modes included)."""
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return fn(x, w, bias, conv.stride, 0, conv.dilation, conv.groups)
    return fn(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def bcn_reference(x, num_groups, weight=None, bias=None, group_weight=None, group_bias=None,
                  running_mean=None, running_var=None, training=True, estimate=False,
                  momentum=0.1, eps=1e-5, activation=None, num_batches_tracked=None, dtype=torch.float64,
                  return_rho=False):
    """BN stage then GroupNorm-style channel stage, as the released BCNorm/EstBN
    layers compute it, in float64 (or ``dtype``). Running buffers are updated in place.
    ``return_rho``: also return the gains of the two stages (how much each
    amplifies rounding in its input): 1/sqrt(var_c + eps) per channel and
    1/sqrt(tau^2 + eps) per (n, g)."""
    x = x.to(dtype)
    n, c = x.shape[:2]
    dims = [0] + list(range(2, x.dim()))
    shape_c = (1, c) + (1,) * (x.dim() - 2)
    if training and num_batches_tracked is not None:
        num_batches_tracked += 1
    factor = momentum if momentum is not None else (1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0)
    if training and not estimate:
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, correction=0)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - factor).add_(factor * mean)
                running_var.mul_(1 - factor).add_(factor * x.var(dim=dims, correction=1))
    else:
        if training:  # EstBN: update under no_grad, then normalize with the new estimates
            with torch.no_grad():
                batch_mean = x.mean(dim=dims)
                centred = x - running_mean.view(shape_c)
                batch_var = (centred * centred).mean(dim=dims)
                running_mean.mul_(1 - factor).add_(factor * batch_mean)
                running_var.mul_(1 - factor).add_(factor * batch_var)
        mean, var = running_mean.detach().clone(), running_var.detach().clone()
    u = (x - mean.view(shape_c)) / torch.sqrt(var.view(shape_c) + eps)
    r = 1.0 / torch.sqrt(var.detach() + eps)
    if weight is not None:
        u = u * weight.to(dtype).view(shape_c) + bias.to(dtype).view(shape_c)
    grouped = u.reshape(n, num_groups, -1)
    nu = grouped.mean(dim=2, keepdim=True)
    tau = grouped.var(dim=2, correction=0, keepdim=True)
    y = ((grouped - nu) / torch.sqrt(tau + eps)).reshape(x.shape)
    rho = 1.0 / torch.sqrt(tau.detach() + eps)
    if group_weight is not None:
        gw, gb = group_weight.to(dtype).reshape(-1), group_bias.to(dtype).reshape(-1)
        if gw.numel() == num_groups and num_groups != c:
            gw, gb = gw.repeat_interleave(c // num_groups), gb.repeat_interleave(c // num_groups)
        y = y * gw.view(shape_c) + gb.view(shape_c)
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "silu":
        y = F.silu(y)
    return (y, r, rho) if return_rho else y


def gn_reference(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, dtype=torch.float64):
    x = x.to(dtype)
    grouped = x.reshape(x.shape[0], num_groups, -1)
    y = ((grouped - grouped.mean(dim=2, keepdim=True)) /
         torch.sqrt(grouped.var(dim=2, correction=0, keepdim=True) + eps)).reshape(x.shape)
    if weight is not None:
        shape_c = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        y = y * weight.to(dtype).view(shape_c) + bias.to(dtype).view(shape_c)
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "silu":
        y = F.silu(y)
    return y


class ReleasedEstBN(torch.nn.Module):
    """The authors' released EstBN layer (estimate mode of BCNorm), for state-dict tests."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features
        self.weight = torch.nn.Parameter(torch.ones(num_features))
        self.bias = torch.nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("estbn_moving_speed", torch.zeros(1))

    def forward(self, inp):
        ms = self.estbn_moving_speed.item()
        if self.training:
            with torch.no_grad():
                inp_t = inp.transpose(0, 1).contiguous().view(self.num_features, -1)
                running_mean = inp_t.mean(dim=1)
                inp_t = inp_t - self.running_mean.view(-1, 1)
                running_var = torch.mean(inp_t * inp_t, dim=1)
                self.running_mean.data.mul_(1 - ms).add_(ms * running_mean.data)
                self.running_var.data.mul_(1 - ms).add_(ms * running_var.data)
        out = inp - self.running_mean.view(1, -1, 1, 1)
        out = out / torch.sqrt(self.running_var + 1e-5).view(1, -1, 1, 1)
        return self.weight.view(1, -1, 1, 1) * out + self.bias.view(1, -1, 1, 1)


class ReleasedBCNorm(torch.nn.Module):
    """The authors' released BCNorm layer."""

    def __init__(self, num_channels, num_groups, eps, estimate=False):
        super().__init__()
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(1, num_groups, 1))
        self.bias = torch.nn.Parameter(torch.zeros(1, num_groups, 1))
        self.bn = ReleasedEstBN(num_channels) if estimate else torch.nn.BatchNorm2d(num_channels)

    def forward(self, inp):
        out = self.bn(inp)
        out = out.view(1, inp.size(0) * self.num_groups, -1)
        out = torch.batch_norm(out, None, None, None, None, True, 0, self.eps, True)
        out = out.view(inp.size(0), self.num_groups, -1)
        out = self.weight * out + self.bias
        return out.view_as(inp)
