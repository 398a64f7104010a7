"""Batched multi-agent particle worlds (the MPE family) on a shared physics core."""
