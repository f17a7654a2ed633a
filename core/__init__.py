"""The kernel: what every layer of diapipe shares, importing nothing else of it.

- :mod:`core.errors` — the error hierarchy (``PipelineError`` and its kinds).
- :mod:`core.ids` — deterministic 64-bit ID packing (DiaSource, DiaForcedSource, ccdVisit).
- :mod:`core.frames` — column access, row selection and frame assembly for pandas (public API only).
- :mod:`core.bundle` — the visit-bundle model and reader (``visit.json``, catalogue, images).

Layers point one way: ``core`` ← ``apdb`` ← ``tasks`` ← ``alerts`` ← ``flows``;
``sim`` and ``bench`` sit beside and the product never imports them
(``tests/test_layering.py`` holds the line).
"""
