"""Efficient-attention policies: one module per policy (config, tensor math, per-layer rule and its
registration, once), and what they share (:mod:`.base`: registry, layer call, per-install state).

* :mod:`.agent` -- agent attention (AgentSD) for UNets, preset ``agentsd``;
* :mod:`.window` -- HiDiffusion's shifted-window attention (MSW-MSA);
* :mod:`.proxy` -- proxy-token attention (training-free PT-DiT);
* :mod:`.grouped` -- GRAT grouped block-sparse attention.

Adding a policy is one module here that calls :func:`register_policy`, plus its import below and
its test. Nothing here imports diffusers; :func:`attnctrl.apply` installs them.
"""

from __future__ import annotations

# Importing a policy's module registers it; this order is the order users see them listed in.
from .agent import AgentAttention
from .window import WindowAttention
from .proxy import ProxyAttention
from .grouped import GroupedAttention
from .base import PolicyCall, PolicySpec, PolicyState, policy_label, policy_names, policy_specs, register_policy, spec_for  # noqa: E402

__all__ = [
    "AgentAttention",
    "WindowAttention",
    "ProxyAttention",
    "GroupedAttention",
    "PolicyCall",
    "PolicySpec",
    "PolicyState",
    "register_policy",
    "policy_specs",
    "policy_names",
    "policy_label",
    "spec_for",
    "config_types",
]


def config_types() -> tuple[type, ...]:
    """The config classes of every registered policy (what :func:`attnctrl.apply` accepts)."""
    return tuple(spec.config for spec in policy_specs())
