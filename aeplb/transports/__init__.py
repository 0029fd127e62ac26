"""Transports: one module per way of moving bytes between ranks."""
