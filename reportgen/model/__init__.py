"""Loading a Vision Transformer, running it with attention capture, and the object detector."""
