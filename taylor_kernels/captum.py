"""Captum drop-in front: switch one import line and keep the rest of your code.

```python
# from captum.attr import IntegratedGradients, LayerIntegratedGradients, NoiseTunnel, GradientShap
from taylor_kernels.captum import (IntegratedGradients, LayerIntegratedGradients, NoiseTunnel,
                                   GradientShap)
```

Captum's path-integral surface: also ``NeuronIntegratedGradients``, ``NeuronConductance``,
``LayerConductance``, ``InternalInfluence``, ``LayerGradientShap`` (and
``LLMGradientAttribution``). Same constructors, ``attribute`` signatures, defaults, argument
forms (tensor in -> tensor out, tuple in -> tuple out; baselines, targets, additional forward
args; layer lists and tuple activations), ``return_convergence_delta``,
``compute_convergence_delta``, ``has_convergence_delta``, ``multiplies_by_inputs``,
``attribute_future`` (not implemented, as in Captum) and results as ``captum.attr`` 0.9 (to
rounding; the sampled methods draw the same random numbers under the same
``torch.manual_seed`` / ``numpy.random.seed``). Bad input raises Captum's exception type
(``AssertionError``, ``IndexError``, ``ZeroDivisionError``, ``RuntimeError``) as a
``ValueError`` / ``TypeError`` subclass. The work
runs on the chunked, memory-budgeted path engine and the selected kernel backend. Extras on
every ``attribute``: ``max_memory=``, ``backend=``, ``progress=``; IG also
``method="adaptive"`` with ``tol=``. After a call, ``instance.last_result`` holds the
:class:`~taylor_kernels.AttributionResult` (evaluations).
Captum itself is not needed at run time for these. Every other public name of
``captum.attr`` (``Saliency``, ``FeatureAblation``, ...) imports from here as Captum's own
class (Captum installed), so a whole import line switches. Implementation:
:mod:`taylor_kernels.captum_front`.

For libraries built on Captum (Inseq, ...) that create Captum's classes themselves::

    import taylor_kernels.captum as tkc
    tkc.patch()          # Captum's IG-family classes (and LLMGradientAttribution) now run
                         # on taylor-kernels, in place
    ...                  # unchanged library code
    tkc.unpatch()        # every patched attribute restored exactly
    with tkc.patched():  # the same, for one block
        ...
"""
from taylor_kernels.captum_front import (GradientShap, IntegratedGradients, InternalInfluence,
                                         LayerConductance, LayerGradientShap,
                                         LayerIntegratedGradients, NeuronConductance,
                                         NeuronIntegratedGradients, NoiseTunnel)
from taylor_kernels.captum_front.llm import (LLMAttributionResult, LLMGradientAttribution,
                                             TextTokenInput,
                                             register_with_captum as _register_with_captum)
from taylor_kernels.captum_front.patch import is_patched, patch, patched, unpatch

_OWN = ["GradientShap", "IntegratedGradients", "InternalInfluence", "LayerConductance",
        "LayerGradientShap", "LayerIntegratedGradients", "LLMAttributionResult",
        "LLMGradientAttribution", "NeuronConductance", "NeuronIntegratedGradients",
        "NoiseTunnel", "TextTokenInput", "is_patched", "patch", "patched", "unpatch"]


def __getattr__(name: str):
    """Every other public name of ``captum.attr`` (``Saliency``, ``FeatureAblation``,
    ``TextTemplateInput``, ``visualization``...) is Captum's own, so that switching a whole
    ``from captum.attr import ...`` line keeps working; those run Captum's code. ``__all__``
    is ours and, with Captum installed, ``captum.attr``'s (so ``from taylor_kernels.captum
    import *`` gives every name ``from captum.attr import *`` does; looked up only then, as
    importing Captum imports matplotlib)."""
    if name == "__all__":
        try:
            import captum.attr
        except ImportError:
            return list(_OWN)
        return list(_OWN) + [n for n in captum.attr.__all__ if n not in _OWN]
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        import captum.attr
    except ImportError:
        raise AttributeError(f"taylor_kernels.captum implements {', '.join(_OWN[:12])}...; "
                             f"{name!r} would be Captum's own class: install captum") from None
    _register_with_captum()  # Captum's LLMAttribution then takes our TextTokenInput
    try:
        return getattr(captum.attr, name)
    except AttributeError:
        raise AttributeError(f"neither taylor_kernels.captum nor captum.attr has {name!r}") \
            from None


def __dir__() -> list[str]:
    """Our names, and ``captum.attr``'s when Captum is installed (what ``__getattr__`` gives)."""
    names = set(globals())
    try:
        import captum.attr
        names.update(n for n in dir(captum.attr) if not n.startswith("_"))
    except ImportError:
        pass
    return sorted(names)
