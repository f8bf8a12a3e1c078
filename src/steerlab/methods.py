"""The built-in intervention methods: the one list of them. Importing this module registers each
(the intervention registry imports it on first use); a new method is one more module here, or any
module of yours that applies :func:`steerlab.interventions.register` to its class."""

from __future__ import annotations

from .explain import selfie_control, selfie_rl
from .protocols import correction
from .steer import aura, eigenshift, iti, slim, vector

BUILTIN = {"steering": vector.SteeringVector, "iti": iti.ITI, "slim": slim.SLIM, "aura": aura.AurA,
           "eigenshift": eigenshift.EigenShift, "selfcorrect": correction.SelfCorrection,
           "selfie-control": selfie_control.SelfieControl, "selfie-rl": selfie_rl.SelfieRL}
"""Built-in method name -> class."""
