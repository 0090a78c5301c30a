"""flowlib: normalizing-flow anomaly detection on industrial images, in small reusable pieces.

Modules: :mod:`flowlib.coupling` (invertible blocks), :mod:`flowlib.subnets`,
:mod:`flowlib.positional`, :mod:`flowlib.backbones`, :mod:`flowlib.data`, :mod:`flowlib.metrics`,
:mod:`flowlib.engine`, :mod:`flowlib.results`, :mod:`flowlib.viz` and :mod:`flowlib.models`.
"""

__version__ = "0.1.0"
