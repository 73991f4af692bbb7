"""Built-in losses: plain MSE and the attention-mask weighted MSE."""
from __future__ import annotations

import attrs

from hcp_core.hookspecs import hookimpl


@attrs.define
class MseConfig:
    """Mean squared error between the UNet prediction and its target (epsilon or velocity)."""


@attrs.define
class MaskedMseConfig:
    """MSE with each element weighted by the batch's attention-mask weight map, then averaged.

    hcp switches ``mse`` to this automatically for datasets that have attention masks.
    """


@hookimpl
def hcp_register_losses(registry) -> None:
    registry.add("mse", config=MseConfig, factory="hcp_plugins.losses.mse:MseLoss")
    registry.add("masked_mse", config=MaskedMseConfig, factory="hcp_plugins.losses.mse:MaskedMseLoss")
