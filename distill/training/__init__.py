"""Ground floor: the training loop both trainers share (``loop``): optimizer,
resumable checkpoints with the data iterator, metrics, eval hook, SIGTERM."""
