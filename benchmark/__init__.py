"""The bundled model, its evaluator and the benchmarks that measure what ELA fixes."""
