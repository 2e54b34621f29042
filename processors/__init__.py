"""diffusers attention processors: thin adapters from an ``Attention`` module to attnctrl."""

from .lifecycle import attention_modules, bind_timestep, install, is_installed, layers_installed, restore
from .efficient import (
    AgentAttentionProcessor,
    GroupedAttentionProcessor,
    PolicyProcessor,
    ProxyAttentionProcessor,
    WindowAttentionProcessor,
)
from .p2p import PromptToPromptProcessor

__all__ = [
    "PromptToPromptProcessor",
    "PolicyProcessor",
    "AgentAttentionProcessor",
    "WindowAttentionProcessor",
    "ProxyAttentionProcessor",
    "GroupedAttentionProcessor",
    "install",
    "restore",
    "is_installed",
    "attention_modules",
    "bind_timestep",
    "layers_installed",
]
