"""rrepa: TARFlow normalizing flows with Reverse Representation Alignment (R-REPA)."""

from rrepa.flow import PRESETS, FlowConfig, FlowOutput, TARFlow, preset

__all__ = ["PRESETS", "FlowConfig", "FlowOutput", "TARFlow", "preset"]
__version__ = "0.1.0"
