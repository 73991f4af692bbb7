"""Built-in losses: MSE, which applies attention-mask weights itself (``masked_mse`` is its old name)."""
from __future__ import annotations

import attrs

from hcp_core.hookspecs import hookimpl
from hcp_core.registry import FamilyRegistry


@attrs.define
class MseConfig:
    """Mean squared error between the UNet prediction and its target (epsilon or velocity), each
    element weighted by the attention-mask weight map when the data has masks."""


@attrs.define
class MaskedMseConfig:
    """The old name of mse (which applies attention-mask weights itself); kept so old configs work."""


@hookimpl
def hcp_register_losses(registry: FamilyRegistry) -> None:
    registry.add("mse", config=MseConfig, factory="hcp_plugins.losses.mse:MseLoss")
    registry.add("masked_mse", config=MaskedMseConfig, factory="hcp_plugins.losses.mse:MseLoss")
