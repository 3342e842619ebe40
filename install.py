"""Run by the WebUI at start (unless --skip-install). ELA needs nothing beyond the WebUI's own
packages; it only checks that torch is new enough for forward pre-hooks with keyword arguments
(``register_forward_pre_hook(..., with_kwargs=True)``, torch 2.0), which the attention capture uses.
"""

from importlib.metadata import PackageNotFoundError, version

MINIMUM_TORCH = (2, 0)

try:
    torch_version = version("torch")
except PackageNotFoundError:
    torch_version = None

if torch_version is not None:
    major_minor = tuple(int(part) for part in torch_version.split("+")[0].split(".")[:2])
    if major_minor < MINIMUM_TORCH:
        print(f"[Entity Anchoring (ELA)] torch {torch_version} is too old: ELA needs torch >= "
              f"{'.'.join(map(str, MINIMUM_TORCH))} (forward hooks with keyword arguments). "
              "Update the WebUI's torch; until then ELA leaves every image unanchored.")
