"""Test-wide settings: 8 simulated CPU devices for sharding tests.

XLA reads the flag once, when the backend starts, so it is set before anything
imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
