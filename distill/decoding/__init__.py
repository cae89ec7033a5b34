"""Ground floor: KV-cache generation under jit for any ``Decoder``
(prefill, compiled steps, greedy / temperature / top-p sampling, streaming,
timing)."""
