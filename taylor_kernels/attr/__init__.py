"""Attribution methods built on the engines (what users call)."""
from taylor_kernels.attr.integrated_gradients import AttributionResult, integrated_gradients

__all__ = ["AttributionResult", "integrated_gradients"]
