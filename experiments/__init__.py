"""Experiment configs (``stdlib.py``, ``hf_moe.py``) and the binaries that
run them: ``run`` (every stage) and ``benchmark``."""
