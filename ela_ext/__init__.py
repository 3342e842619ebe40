"""Entity Localization and Anchoring (ELA, ICML 2024): the host-free engine.

Imports only torch, numpy and Pillow, so it runs in tests, in a diffusers loop and inside any
WebUI; ``scripts/`` translates the WebUI's objects into these calls.
"""
