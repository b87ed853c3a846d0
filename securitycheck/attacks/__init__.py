"""The attack catalog, one module per class (each registers its cases on import)."""
