"""Where the benchmark's files live (bundled weights, prompt lists, ``runs/``), computed in one place so
that no module's depth in the package decides a path, and cached run keys naming the weights stay the same."""

from pathlib import Path

BENCHMARK_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = BENCHMARK_DIR / "weights"
BUNDLED_WEIGHTS = WEIGHTS_DIR / "model.safetensors"
PROMPTS_DIR = BENCHMARK_DIR / "prompts"
RUNS_DIR = BENCHMARK_DIR.parent / "runs"  # git-ignored, beside the repository's top-level folders
