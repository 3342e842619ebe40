"""ComfyUI's entry point to this repository, which is also an AUTOMATIC1111/Forge extension.

ComfyUI imports every folder in ``custom_nodes/`` through its ``__init__.py`` and reads
``NODE_CLASS_MAPPINGS``; the WebUI never imports this file (it loads ``scripts/*.py``). pytest
does: the repository root is a package to it, and it imports a package's ``__init__`` while
collecting. Outside ComfyUI (no ``comfy`` package) the mappings are empty and nothing of ComfyUI's
is imported; inside it, an import error in the pack is raised, so ComfyUI reports it.

The repository root is appended to ``sys.path`` so that ``ela_comfy`` and the engine ``ela_ext``
import as top-level packages, as they do in the WebUI and in the tests; appended, not prepended,
so that no folder here shadows a module of ComfyUI's.
"""

import importlib.util
import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

def _in_comfyui() -> bool:
    """ComfyUI's own ``comfy`` package is importable. Not just any ``comfy``: pytest puts the
    checkout's parent folder on ``sys.path``, where a folder named ``comfy`` (a ComfyUI install
    beside the checkout) is a namespace package without ComfyUI's modules."""
    try:
        return importlib.util.find_spec("comfy.model_patcher") is not None
    except ImportError:
        return False


if _in_comfyui():
    _ROOT = os.path.dirname(os.path.abspath(__file__))
    if _ROOT not in sys.path:
        sys.path.append(_ROOT)
    from ela_comfy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402,F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
