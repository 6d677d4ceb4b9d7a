"""Attribution methods built on the engines (what users call)."""
from taylor_kernels.attr.expected_gradients import expected_gradients
from taylor_kernels.attr.integrated_gradients import AttributionResult, integrated_gradients
from taylor_kernels.attr.layer import layer_integrated_gradients
from taylor_kernels.attr.noise_tunnel import noise_tunnel
from taylor_kernels.attr.shapley_ig import shapley_integrated_gradients

__all__ = ["AttributionResult", "expected_gradients", "integrated_gradients",
           "layer_integrated_gradients", "noise_tunnel", "shapley_integrated_gradients"]
