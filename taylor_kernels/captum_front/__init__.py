"""Implementation of :mod:`taylor_kernels.captum` (the Captum drop-in front); import from there."""
from taylor_kernels.captum_front.ig import IntegratedGradients, LayerIntegratedGradients
from taylor_kernels.captum_front.layer import (InternalInfluence, LayerConductance,
                                               LayerGradientShap)
from taylor_kernels.captum_front.neuron import NeuronConductance, NeuronIntegratedGradients
from taylor_kernels.captum_front.sampling import GradientShap, NoiseTunnel

__all__ = ["GradientShap", "IntegratedGradients", "InternalInfluence", "LayerConductance",
           "LayerGradientShap", "LayerIntegratedGradients", "NeuronConductance",
           "NeuronIntegratedGradients", "NoiseTunnel"]
from taylor_kernels.captum_front.llm import (LLMAttributionResult,  # noqa: E402,F401
                                             LLMGradientAttribution, TextTokenInput)
