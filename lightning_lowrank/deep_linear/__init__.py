"""The compressed deep linear method: overparameterized factor chains with spectral initialization.

``layers`` holds :class:`DeepLinear`; ``conversion`` replaces a model's Linear layers by it. Nothing here imports
Lightning.
"""
