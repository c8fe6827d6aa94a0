"""Jobs and apps on the engine interface: typed specs and the one engine factory, ``match`` as named stages,
sharded jobs, the Ray runner, evaluation on benchmark datasets and the benchmark harness. Nothing here knows which
backend it drives."""
