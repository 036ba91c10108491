"""The draft model: config, layers, SAL cache, the model, its checkpoint, the target's
frozen pieces."""
