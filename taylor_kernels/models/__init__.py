"""Model adapters: what users hand us (Hugging Face models, ``ModelOutput``s, token ids with
attention masks) turned into the engine's ``[B, D] -> [B]`` problem.

* :mod:`~taylor_kernels.models.outputs` (torch only): which output tensor is attributed.
* :mod:`~taylor_kernels.models.hf`: token ids through the input-embedding layer, per-row
  keyword arguments, padding, low precision, attention backends. ``transformers`` is never
  imported here: models are handled by duck typing (``get_input_embeddings``, ``config``).
"""
from taylor_kernels.models.outputs import SelectOutput, model_output

__all__ = ["SelectOutput", "model_output"]
