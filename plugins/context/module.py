"""``context.moc`` in a model: the shared ``AttentionMixer`` with the MoC op.

With the training options on (``drop_off`` / ``drop_in`` > 0) the mixer draws a fresh seed for
every training forward (``seed + step``) and turns both options off in eval mode, so evaluation
is deterministic and uses the router's own choice.
"""

from __future__ import annotations

from ...core.context import BuildContext, Context
from ..attention.module import AttentionMixer


class MoCMixer(AttentionMixer):
    def __init__(self, ctx: BuildContext, params) -> None:
        super().__init__(ctx, "context.moc", params)
        self._drops = bool(params.drop_off > 0 or params.drop_in > 0)
        self._seed0 = int(params.seed)
        self._step = 0

    def forward(self, x, context: Context | None = None):
        if not self._drops:
            return super().forward(x, context)
        kw = self.attn.kwargs
        saved = (kw["drop_off"], kw["drop_in"], kw["seed"])
        if self.training:
            kw["seed"] = self._seed0 + self._step
            self._step += 1
        else:
            kw["drop_off"], kw["drop_in"] = 0.0, 0.0
        try:
            return super().forward(x, context)
        finally:
            kw["drop_off"], kw["drop_in"], kw["seed"] = saved


def moc_module(ctx: BuildContext, params) -> AttentionMixer:
    return MoCMixer(ctx, params)
