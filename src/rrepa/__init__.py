"""rrepa: TARFlow normalizing flows with Reverse Representation Alignment (R-REPA)."""

# The names are loaded on first use (PEP 562), so that importing rrepa.cli does not import torch: the `rrepa`
# command sets its OpenMP defaults first, which only take effect before torch is loaded.
__all__ = ["PRESETS", "FlowConfig", "FlowOutput", "TARFlow", "preset"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from rrepa import flow

        return getattr(flow, name)
    raise AttributeError(f"module 'rrepa' has no attribute {name!r}")
