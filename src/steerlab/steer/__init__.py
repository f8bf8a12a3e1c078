"""Steering: vectors (activation addition) and, later, weight edits and gated interventions."""

from .vector import SteeringVector, VectorError

__all__ = ["SteeringVector", "VectorError"]
