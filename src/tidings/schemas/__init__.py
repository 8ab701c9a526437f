"""Event schemas: compatibility by meaning (compat.py) and fast validation (validate.py).

The pure core of the schema registry: no I/O, nothing of the bus or the store. It imports
only `tidings.errors` and the libraries it names.
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
