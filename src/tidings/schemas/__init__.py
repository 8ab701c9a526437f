"""Event schemas: compatibility by meaning (compat.py) and fast validation (validate.py).

Those two are the registry's pure core: no I/O, nothing of the bus or the store, and of
Tidings they import only `tidings.errors`. registry.py builds the registry on them.
"""

from tidings.schemas.compat import Incompatibility, Mode, backward, check, closed, forward
from tidings.schemas.validate import SchemaViolation, pointer, validator

__all__ = [
    "Incompatibility",
    "Mode",
    "SchemaViolation",
    "backward",
    "check",
    "closed",
    "forward",
    "pointer",
    "validator",
]
