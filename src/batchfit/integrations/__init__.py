"""Adapters that bring batchfit's measurement into the trainers people already use; each imports
its framework only when used."""
