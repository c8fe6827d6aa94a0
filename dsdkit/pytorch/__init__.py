"""The PyTorch backend: loading SD2-architecture models, the scoring forward (attention processors, pooling), the
:class:`~dsdkit.pytorch.scorer.Scorer` engine, adapters, ``torch.compile``, heat maps (``explain``), the naive
reference scorer and random-weight test models. Everything that imports torch lives here or in ``dsdkit.train`` and
``dsdkit.export``; the layers above reach it only through :func:`dsdkit.jobs.engines.open_engine`."""
