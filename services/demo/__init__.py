"""Offline demo: a small CLIP trained here on Fashion-MNIST, and its sample images."""
