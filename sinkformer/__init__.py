"""sinkformer: natively unlearnable language models (NULLs) in JAX/Flax."""

__version__ = "0.1.0"
