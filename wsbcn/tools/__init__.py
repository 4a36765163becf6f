"""wsbcn's tooling, apart from the library: the ``wsbcn`` command, benchmarks,
autotuning, plots, the training demo and the reference (plain PyTorch) layers
the benchmarks compare against. Nothing in the library imports from here."""
