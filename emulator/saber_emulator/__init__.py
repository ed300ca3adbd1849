"""saber_emulator: a vLLM-compatible engine emulator with a step-level continuous-batching model."""
