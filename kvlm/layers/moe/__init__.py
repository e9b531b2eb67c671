"""Sparse Mixture-of-Experts: routing (router.py), token movement (dispatch.py), the layer."""

from kvlm.layers.moe.router import (
    Routing,
    compute_capacity,
    entropy_losses,
    experts_choose_routing,
    load_balancing_loss,
    router_z_loss,
    tokens_choose_routing,
)
from kvlm.layers.moe.sparse_moe import SparseMoE

__all__ = [
    "Routing",
    "SparseMoE",
    "compute_capacity",
    "entropy_losses",
    "experts_choose_routing",
    "load_balancing_loss",
    "router_z_loss",
    "tokens_choose_routing",
]
