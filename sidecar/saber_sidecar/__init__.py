"""saber_sidecar: the SLA-aware admission gate in front of a vLLM engine."""
