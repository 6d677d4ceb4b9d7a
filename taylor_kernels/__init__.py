"""taylor-kernels: compiled kernels for Taylor-framework attribution (IG, Hessians, jets).

Public API (see README): ``integrated_gradients``, ``expected_gradients``,
``shapley_integrated_gradients``, ``backends``, ``ops``.
"""
from taylor_kernels import backends, ops
from taylor_kernels.attr import (AttributionResult, expected_gradients, integrated_gradients,
                                 layer_integrated_gradients, noise_tunnel,
                                 shapley_integrated_gradients)
from taylor_kernels.attr.interactions import (global_interactions, greedy_interaction_sets,
                                              interactions)
from taylor_kernels.attr.taylor_cam import taylor_cam
from taylor_kernels.attr.taylor_decomposition import TaylorDecomposition, taylor_decomposition
from taylor_kernels.attr.unification import MethodSettings, fourteen_methods
from taylor_kernels.attr.unification_table import unification_table
from taylor_kernels.engine.jet import jet, mixed_partials
from taylor_kernels.attr.group_hessians import GroupInteractions, group_integrated_hessians
from taylor_kernels.attr.integrated_hessians import (InteractionResult, expected_hessians,
                                                     integrated_hessians)
from taylor_kernels.engine.derivative import (hessian, hessian_block, hessian_diagonal, hvp,
                                              third_order)
from taylor_kernels.engine.cuda_graphs import cuda_graphs
from taylor_kernels.engine.guards import allow_row_coupling
from taylor_kernels import priors  # noqa: E402  (DAPr; needs attr imported first)

__version__ = "0.1.0"
__all__ = ["AttributionResult", "backends", "expected_gradients", "integrated_gradients",
           "layer_integrated_gradients", "noise_tunnel", "ops", "shapley_integrated_gradients"]
__all__ += ["global_interactions", "greedy_interaction_sets", "interactions", "taylor_cam"]
__all__ += ["jet", "mixed_partials"]
__all__ += ["MethodSettings", "TaylorDecomposition", "fourteen_methods", "taylor_decomposition",
            "unification_table"]
__all__ += ["InteractionResult", "expected_hessians", "hessian", "hessian_block",
            "hessian_diagonal", "hvp",
            "integrated_hessians", "third_order", "group_integrated_hessians",
            "GroupInteractions"]
__all__ += ["priors"]
__all__ += ["allow_row_coupling", "cuda_graphs"]
from taylor_kernels.attr.generation import GenerationAttribution, generation_attribution  # noqa: E402
from taylor_kernels.models.hf import token_integrated_gradients, token_interactions  # noqa: E402
__all__ += ["GenerationAttribution", "generation_attribution", "token_integrated_gradients",
            "token_interactions"]
