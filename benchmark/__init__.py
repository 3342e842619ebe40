"""A small text-to-image benchmark for ELA: procedurally drawn two-object scenes, an exact evaluator,
and a tiny SD-layout diffusion model trained here on CPU that mixes up objects the way SD does."""
