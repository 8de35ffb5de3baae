"""Training: data from the target, chat corpora, torchrun sessions, CSGD training and resumable
training-run checkpoints."""
