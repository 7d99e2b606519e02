"""Sparse inference that really skips inactive blocks.

``make_inference`` (:mod:`~ccjax.inference.api`) is the one entry point for every gated
model family; :mod:`~ccjax.inference.layout`, :mod:`~ccjax.inference.batch1`,
:mod:`~ccjax.inference.minibatch`, :mod:`~ccjax.inference.capacity` and
:mod:`~ccjax.inference.cnn` hold the MLP and CNN paths, and
:mod:`~ccjax.inference.kernels` one module per backend.
"""
