"""Runtimes: one model instance in memory, run on numpy arrays; one module per framework.

:mod:`.base` holds the :class:`~.base.Runtime` interface and the one registry of served platforms
(filled once: the built-in modules here, then the ``modelseal.runtimes`` entry-point group); to serve a
new framework, add a module that defines a runtime class and one :class:`~.base.RuntimeInfo`
(see docs/serving.md, "Adding a runtime"). Framework imports happen when an instance is built, never
when this package is imported.
"""
