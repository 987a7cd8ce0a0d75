"""The Lightning glue: the callbacks of both methods, checkpoint loading and rank curves from a run's logs.

Everything that imports ``lightning`` lives here; the methods themselves (``tucker``, ``deep_linear``) do not.
"""
