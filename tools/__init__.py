"""Developer tools: model generation, benchmarks and the fleet controller."""
