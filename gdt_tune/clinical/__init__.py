"""Clinical scoring shared by training (in-run metrics) and ``gdt-tune evaluate``."""
