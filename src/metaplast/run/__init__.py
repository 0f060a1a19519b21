"""The runner (Lightning + Hydra): config schema, module, entry points, callbacks, resume, tracking."""
