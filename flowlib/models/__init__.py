"""Methods: each module registers one model with :func:`flowlib.models.base.register_method`."""

from flowlib.models.base import (
    AnomalyModel,
    MethodConfig,
    available_methods,
    build_model,
    get_config,
    method_spec,
    register_method,
)

__all__ = ["AnomalyModel", "MethodConfig", "available_methods", "build_model", "get_config",
           "method_spec", "register_method"]
