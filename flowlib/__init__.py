"""flowlib: normalizing-flow anomaly detection on industrial images, in small reusable pieces.

Modules: :mod:`flowlib.coupling` (invertible blocks), :mod:`flowlib.subnets`,
:mod:`flowlib.positional`, :mod:`flowlib.backbones`, :mod:`flowlib.data`, :mod:`flowlib.metrics`,
:mod:`flowlib.engine`, :mod:`flowlib.results`, :mod:`flowlib.viz`, :mod:`flowlib.models` and
:mod:`flowlib.malloc` (applied on import: lets glibc reuse freed tensor memory).
"""

__version__ = "0.1.0"

from flowlib.malloc import tune_malloc as _tune_malloc

_tune_malloc()  # reuse freed CPU tensor memory (flowlib/malloc.py; FLOWLIB_MALLOC=default turns it off)
