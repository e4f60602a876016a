"""Checkpoints users already have: read them in the formats they come in, merge them, write them back.

``formats`` opens single safetensors files, sharded Hugging Face folders and PyTorch state-dict files
as one TensorSource each; ``write`` writes single or sharded safetensors atomically; ``merge`` runs any
registered merge over a base and its fine-tuned candidates; ``unpickle`` imports a pickled whole model
without running any code it names.
"""
