"""Feature capture: forward hooks at exactly the (model, feature, layer) an objective needs.

* :mod:`.plan` — :class:`CapturePlan`, what each model must deliver (no torch);
* :mod:`.hooks` — :class:`ModelCapture`, the hooks on one model and the features they yield;
* :mod:`.extractor` — :class:`FeatureExtractor`, one teacher (no grad) + student (grad)
  forward that returns a :class:`~makd_registry.features.FeatureSet`.

Importing this package imports no torch; import the submodules for the torch parts.
"""

from __future__ import annotations

from .plan import CapturePlan, SidePlan

__all__ = ["CapturePlan", "SidePlan"]
