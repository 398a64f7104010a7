"""Coordination games from the papers' appendices."""
