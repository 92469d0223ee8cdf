"""Weight sources, one module per dynamic option; importing them registers them."""
from ablate.ops.sources import attention, dynamic, static  # noqa: F401  (registration)
