"""Evaluation primitives above the data floor: per-token metrics
(``metrics``), one validation pass for any models (``validation``) and the
report a person reads (``report``)."""
