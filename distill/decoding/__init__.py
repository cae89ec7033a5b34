"""Ground floor: KV-cache generation under jit for any ``Decoder``
(prefill, a compiled decode loop per chunk of tokens, greedy / temperature /
top-p sampling, streaming, timing)."""
