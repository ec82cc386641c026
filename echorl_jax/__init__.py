"""echorl-jax: JAX-native RLVR post-training with EchoRL."""

__version__ = "0.1.0"
