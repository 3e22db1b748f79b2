"""The ``gdt-tune`` command line (``main.py``) and what only its commands use: the training
launcher, ``export``, and the demo's assets."""
