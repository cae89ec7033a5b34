"""Ground floor: the training loop both trainers share (``loop``): optimizer,
resumable checkpoints with the data iterator, metrics (``records``), eval
hook, SIGTERM, replayed-step checks for silent corruption (``replay``)."""
