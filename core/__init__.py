"""Pieces every part of the app shares: settings, storage clients, logging, HTTP helpers."""
