"""Particle scenarios, one file each."""
