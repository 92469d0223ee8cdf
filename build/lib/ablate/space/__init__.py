"""The operator space: the spec, its validity rules, the named presets and the grid of axes."""
from ablate.space.rules import InvalidOperatorError, validate
from ablate.space.spec import Connectivity, Dynamic, OperatorSpec, Sharing

__all__ = ["Connectivity", "Dynamic", "OperatorSpec", "Sharing", "InvalidOperatorError", "validate"]
