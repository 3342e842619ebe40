"""The WebUI side of the extension: what ``scripts/ela.py`` needs from the host's modules.

``ela_ext`` never imports the WebUI; this package is the only code besides ``scripts/`` that
does. It lives at the extension root (on ``sys.path`` while the WebUI loads scripts) rather than in
``scripts/``, because the WebUI would load every ``.py`` there as a script of its own.
"""
