"""Data floor: corpus builders (TFDS), tokenizer, grain pipeline, and the
logit cache's format, reader and verification; ``data.prepare`` is the
prepare stage."""
