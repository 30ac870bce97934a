"""Ground floor: model sources, family adapters, the rewritten-model format and the text encoder."""
