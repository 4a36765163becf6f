"""Naive float64 references: the methods written out with plain torch ops, the way
the paper and the authors' released layers compute them. Never the closed form."""
import torch
import torch.nn.functional as F


def ws_reference(w: torch.Tensor, eps=1e-5, correction=0, eps_mode="var") -> torch.Tensor:
    flat = w.double().reshape(w.shape[0], -1)
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
