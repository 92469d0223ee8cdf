"""The operator space: the spec, its validity rules, the named presets and the grid of axes."""
from ablate.space.spec import Connectivity, Dynamic, OperatorSpec, Sharing
from ablate.space.rules import InvalidOperatorError, validate

__all__ = ["Connectivity", "Dynamic", "OperatorSpec", "Sharing", "InvalidOperatorError", "validate"]
