"""Device firmware models that speak the real bytes, for tests and demos."""
