"""Text generation from chat messages."""

from .hf import generate_chat

__all__ = ["generate_chat"]
