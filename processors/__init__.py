"""diffusers attention processors: thin adapters from an ``Attention`` module to attnctrl."""

from .lifecycle import attention_modules, bind_timestep, install, is_installed, layers_installed, restore
from .efficient import PolicyProcessor
from .joint import JointAttentionProcessor, check_joint_supported
from .joint_policy import EditUnderPolicy, JointPolicyAttention, JointPolicyProcessor
from .p2p import PromptToPromptProcessor

__all__ = [
    "PromptToPromptProcessor",
    "JointAttentionProcessor",
    "check_joint_supported",
    "PolicyProcessor",
    "JointPolicyProcessor",
    "JointPolicyAttention",
    "EditUnderPolicy",
    "install",
    "restore",
    "is_installed",
    "attention_modules",
    "bind_timestep",
    "layers_installed",
]
