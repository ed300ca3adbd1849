"""saber_bench: workloads, load generator, discrete-event simulator, reports and plots."""
