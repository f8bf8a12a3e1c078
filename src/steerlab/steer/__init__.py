"""Steering: vectors (activation addition), EigenShift (an unembedding edit) and AurA (MLP unit dampening)."""

from .aura import AurA
from .eigenshift import EigenShift
from .vector import SteeringVector, VectorError

__all__ = ["AurA", "EigenShift", "SteeringVector", "VectorError"]
