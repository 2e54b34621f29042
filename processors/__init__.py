"""diffusers attention processors: thin adapters from an ``Attention`` module to attnctrl."""

from ._install import attention_modules, install, is_installed, restore
from .efficient import AgentAttentionProcessor
from .p2p import PromptToPromptProcessor

__all__ = ["PromptToPromptProcessor", "AgentAttentionProcessor", "install", "restore", "is_installed", "attention_modules"]
