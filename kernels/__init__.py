"""Decode kernels: CATS sparse MLP (Triton on CUDA, torch reference elsewhere)."""
from .ops import cats_mlp
from .reference import cats_mlp_reference

__all__ = ["cats_mlp", "cats_mlp_reference"]
