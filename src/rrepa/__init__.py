"""rrepa: TARFlow normalizing flows with Reverse Representation Alignment (R-REPA)."""

# The names are loaded on first use (PEP 562), so that importing rrepa.cli does not import torch: the `rrepa`
# command sets its OpenMP defaults first, which only take effect before torch is loaded.
import importlib

__version__ = "0.1.0"
_EXPORTS = {"FlowConfig": "rrepa.flow.config", "FlowOutput": "rrepa.flow.config", "TARFlow": "rrepa.flow.tarflow",
            "PRESETS": "rrepa.training.config", "RunConfig": "rrepa.training.config",
            "resolve": "rrepa.training.config", "preset_model": "rrepa.training.config",
            "load_run": "rrepa.training.run"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rrepa' has no attribute {name!r}")
