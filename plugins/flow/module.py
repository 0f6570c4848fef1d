"""Flow layers as modules, for ``kind: flow`` specs (stacked by core/flow_model.py).

Every exact layer maps ``[..., D] -> [..., D]`` with ``forward(x) -> (y, logdet)`` and
``inverse(y) -> (x, logdet)``; ``logdet`` has the leading shape of x and is the log |det| of the
direction that ran. The functional ops (one per direction) are resolved when the module is
built (``BoundOp``), so dispatch stays out of compiled graphs.

In a flow stack ``ctx.d_model`` is the data dimension D and ``ctx.layer`` counts the layers of
the same component before this one (so successive couplings alternate their mask parity).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.context import BuildContext
from ...core.ops import BoundOp
from ...registry import Inputs
from .reference import coupling_mask

_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _bind(cid: str, params, ctx: BuildContext) -> tuple[BoundOp, BoundOp, str]:
    """Forward and inverse ops with the module's params; the backend resolved now."""
    fwd = BoundOp(cid, params.model_copy(update={"inverse": False}), ctx.backend)
    inv = BoundOp(cid, params.model_copy(update={"inverse": True}), ctx.backend)
    name = fwd.resolve_for(Inputs(device=ctx.device, dtype=ctx.dtype, requires_grad=ctx.training)).name
    return fwd, inv, name


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


class FlowLayer(nn.Module):
    """Base: subclasses implement ``_transform(x2d, inverse) -> (y2d, logdet[N])``."""

    def forward(self, x: torch.Tensor):
        x2, lead = _rows(x)
        y, ld = self._transform(x2, False)
        return y.reshape(x.shape), ld.reshape(lead)

    def inverse(self, y: torch.Tensor):
        y2, lead = _rows(y)
        x, ld = self._transform(y2, True)
        return x.reshape(y.shape), ld.reshape(lead)


def mlp(d_in: int, hidden: int, d_out: int, depth: int, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), _ACT[activation]()]
        width = hidden
    last = nn.Linear(width, d_out)
    nn.init.zeros_(last.weight)   # identity map at init
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class Coupling(FlowLayer):
    """Affine coupling: conditioner MLP on the pass-through dims -> (s, t) -> the fused op."""

    def __init__(self, ctx: BuildContext, params) -> None:
        super().__init__()
        d = ctx.d_model
        parity = params.parity if params.parity is not None else ctx.layer % 2
        params = params.model_copy(update={"parity": parity})
        self.dim = d
        self.register_buffer("keep", coupling_mask(d, params.mask, parity).to(ctx.dtype), persistent=False)
        self.net = mlp(d, params.hidden, 2 * d, params.depth, params.activation)
        self.op_fwd, self.op_inv, self.backend_name = _bind("flow.coupling", params, ctx)

    def _transform(self, x, inverse: bool):
        h = self.net(x * self.keep)
        s, t = h[:, :self.dim], h[:, self.dim:]
        return (self.op_inv if inverse else self.op_fwd)(x, s, t)


class ActNorm(FlowLayer):
    """y = (x + loc) * exp(log_scale); loc / log_scale set from the first training batch."""

    def __init__(self, ctx: BuildContext, params) -> None:
        super().__init__()
        d = ctx.d_model
        self.loc = nn.Parameter(torch.zeros(d))
        self.log_scale = nn.Parameter(torch.zeros(d))
        self.eps = params.eps
        self.register_buffer("initialized", torch.tensor(not params.data_init))
        self.op_fwd, self.op_inv, self.backend_name = _bind("flow.actnorm", params, ctx)

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        xf = x.float()
        mean = xf.mean(0)
        std = xf.std(0, unbiased=False) if xf.shape[0] > 1 else torch.ones_like(mean)
        self.loc.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def _transform(self, x, inverse: bool):
        if not inverse and self.training and not bool(self.initialized):
            self.data_init(x)
        return (self.op_inv if inverse else self.op_fwd)(x, self.loc, self.log_scale)


class Inv1x1(FlowLayer):
    """Invertible linear map W = P L (U + diag(sign exp(log_s))), initialised from a random
    rotation (seeded by ``params.seed`` and the layer's index)."""

    def __init__(self, ctx: BuildContext, params) -> None:
        super().__init__()
        d = ctx.d_model
        gen = torch.Generator().manual_seed(int(params.seed) * 1000 + ctx.layer)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(diag.abs()).float())
        self.register_buffer("sign", torch.sign(diag).float())
        perm = p.argmax(dim=1)                       # P[i, perm[i]] = 1
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))
        self.op_fwd, self.op_inv, self.backend_name = _bind("flow.inv1x1", params, ctx)

    def _transform(self, x, inverse: bool):
        if not inverse:
            z, ld = self.op_fwd(x, self.lower, self.upper, self.log_s, self.sign)
            return z[:, self.perm], ld
        z = x[:, self.inv_perm]
        return self.op_inv(z, self.lower, self.upper, self.log_s, self.sign)


class ResidualMLP(nn.Module):
    """x + net(x): an unconstrained (not necessarily invertible) D -> D map, identity at init."""

    def __init__(self, d: int, hidden: int, blocks: int, activation: str) -> None:
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(_ACT[activation](), nn.Linear(hidden, hidden))
                                    for _ in range(blocks))
        self.act = _ACT[activation]()
        self.out = nn.Linear(hidden, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        for b in self.blocks:
            nn.init.normal_(b[1].weight, std=0.5 / math.sqrt(hidden))

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return x + self.out(self.act(h))


class AIF(nn.Module):
    """flow.aif: free-form encoder f and decoder g (ResidualMLP each) and the surrogate op.
    The training objective, likelihoods and sampling live in core/flow_model.AIFModel."""

    def __init__(self, ctx: BuildContext, params) -> None:
        super().__init__()
        d = ctx.d_model
        self.params = params
        self.encoder = ResidualMLP(d, params.hidden, params.blocks, params.activation)
        self.decoder = ResidualMLP(d, params.hidden, params.blocks, params.activation)
        self.surrogate_op = BoundOp("flow.aif", params, ctx.backend)
        self.backend_name = self.surrogate_op.resolve_for(
            Inputs(device=ctx.device, dtype=ctx.dtype, requires_grad=ctx.training)).name

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)
