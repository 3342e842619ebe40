"""The ComfyUI side of the repository: the node pack's glue around the engine ``ela_ext``.

``nodes`` (the node classes) and ``patch`` (the sampling wrappers) import ComfyUI; ``columns``,
``steps`` and ``report`` compute what the glue needs without it, so they are tested host-free.
Loaded through the repository's root ``__init__.py``.
"""
