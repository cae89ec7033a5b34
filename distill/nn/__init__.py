"""Ground floor: the layers both models are built from (``layers``) and the
decoder base class they share (``decoder``)."""
