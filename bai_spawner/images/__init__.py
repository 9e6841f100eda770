"""Kernel images: recipes, the builder and the ``bai-images`` command."""
